-- Bounds on per-message work that a client could otherwise grow without limit.

-- Acknowledged seqs above a member's floor: at most 1 000 (`MAX_ACKED_ABOVE` in
-- src/db/cursors.rs, which keeps the lowest ones and forgets the rest, to be delivered
-- again). Rows written before the bound existed are trimmed the same way.
UPDATE members SET acked_above = acked_above[1:1000] WHERE cardinality(acked_above) > 1000;
ALTER TABLE members ADD CONSTRAINT members_acked_above_bounded
    CHECK (cardinality(acked_above) <= 1000);

-- Replies matched by correlation id read only the newest requests with that id, newest
-- first, whatever the number of requests that share it.
CREATE INDEX idx_agent_messages_request_correlation
    ON agent_messages(project_id, correlation_id, seq DESC)
    WHERE expects_reply;
