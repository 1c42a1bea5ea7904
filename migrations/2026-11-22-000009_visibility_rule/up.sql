-- Which messages an agent may receive, in one place. `agentbus_owed` (migration 000007) held
-- it together with the expiry test, so the queries that need visibility without expiry (what
-- a delivery report covers, what a read receipt may mark, what the expiry sweep was owed to
-- someone) wrote it out again, and one of them had drifted: a delivery report set
-- `delivered_at` on broadcasts older than the agent's first connection, which it never got.
--
-- A message is visible to an agent when it is addressed to it by name; or when it is a
-- broadcast (to everyone, or to the agent's type) that the agent did not send and that was
-- committed after the agent's first connection (`joined_seq`; NULL: not connected yet).
CREATE FUNCTION agentbus_visible(
    recipient_agent_id TEXT,
    recipient_agent_type TEXT,
    sender_agent_id TEXT,
    seq BIGINT,
    agent_id TEXT,
    agent_type TEXT,
    joined_seq BIGINT
) RETURNS BOOLEAN
LANGUAGE sql IMMUTABLE
AS $$
    SELECT $1 = $5
        OR ($1 IS NULL AND $3 <> $5 AND $4 > COALESCE($7, 9223372036854775807)
            AND ($2 IS NULL OR $2 = $6))
$$;

-- Owed: visible and not expired. Still a single-SELECT SQL function, so the planner inlines
-- both and the indexes on the surrounding conditions are used.
CREATE OR REPLACE FUNCTION agentbus_owed(
    recipient_agent_id TEXT,
    recipient_agent_type TEXT,
    sender_agent_id TEXT,
    seq BIGINT,
    expires_at TIMESTAMP WITH TIME ZONE,
    agent_id TEXT,
    agent_type TEXT,
    joined_seq BIGINT
) RETURNS BOOLEAN
LANGUAGE sql STABLE
AS $$
    SELECT agentbus_visible($1, $2, $3, $4, $6, $7, $8)
       AND ($5 IS NULL OR $5 > now())
$$;
