-- The rule of what an agent is owed, in one place: replay, inboxes, queue depths, the
-- single-message view and the ack floor all call it. A single-SELECT SQL function is inlined
-- by the planner, so indexes on the surrounding conditions (project, seq) are still used.
--
-- A message is owed to an agent when it is addressed to it by name; or when it is a
-- broadcast (to everyone, or to the agent's type) that the agent did not send and that was
-- committed after the agent's first connection (`joined_seq`, NULL until then); and in
-- either case it has not expired. Acknowledgements are the caller's part.
CREATE FUNCTION agentbus_owed(
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
    SELECT ($1 = $6
            OR ($1 IS NULL AND $3 <> $6 AND $4 > COALESCE($8, 9223372036854775807)
                AND ($2 IS NULL OR $2 = $7)))
       AND ($5 IS NULL OR $5 > now())
$$;
