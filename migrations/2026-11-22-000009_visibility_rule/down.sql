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
    SELECT ($1 = $6
            OR ($1 IS NULL AND $3 <> $6 AND $4 > COALESCE($8, 9223372036854775807)
                AND ($2 IS NULL OR $2 = $7)))
       AND ($5 IS NULL OR $5 > now())
$$;
DROP FUNCTION agentbus_visible(TEXT, TEXT, TEXT, BIGINT, TEXT, TEXT, BIGINT);
