-- Request/reply, addressing by agent type, capabilities, dead letters and search.

ALTER TABLE agent_messages
    -- Addressed to every agent of this type (instead of one agent or everyone).
    ADD COLUMN recipient_agent_type VARCHAR(50),
    -- A request: its sender waits for a reply until reply_deadline.
    ADD COLUMN expects_reply BOOLEAN NOT NULL DEFAULT false,
    ADD COLUMN reply_deadline TIMESTAMP WITH TIME ZONE,
    -- When the first reply (or the broker's timeout response) was committed.
    ADD COLUMN replied_at TIMESTAMP WITH TIME ZONE,
    -- Replies: the request's seq, the outcome, and the time from request to reply.
    ADD COLUMN in_reply_to_seq BIGINT,
    ADD COLUMN success BOOLEAN,
    ADD COLUMN error TEXT,
    ADD COLUMN duration_ms BIGINT,
    ADD COLUMN late BOOLEAN NOT NULL DEFAULT false;

-- Requests still waiting for a reply, by deadline (loaded at start-up to re-arm timeouts).
CREATE INDEX idx_agent_messages_pending_requests
    ON agent_messages(reply_deadline)
    WHERE expects_reply AND replied_at IS NULL;
CREATE INDEX idx_agent_messages_correlation
    ON agent_messages(project_id, correlation_id)
    WHERE correlation_id IS NOT NULL;
CREATE INDEX idx_agent_messages_reply_to
    ON agent_messages(project_id, reply_to)
    WHERE reply_to IS NOT NULL;
-- Free-text search over content (`q=`).
CREATE INDEX idx_agent_messages_content_search
    ON agent_messages USING GIN (to_tsvector('simple', content));
-- Messages that may expire undelivered, for the dead-letter sweep.
CREATE INDEX idx_agent_messages_expiring
    ON agent_messages(expires_at)
    WHERE expires_at IS NOT NULL AND delivered_at IS NULL;

ALTER TABLE members
    ADD COLUMN capabilities TEXT[] NOT NULL DEFAULT '{}',
    ADD COLUMN description TEXT;

CREATE TABLE dead_letters (
    message_id UUID PRIMARY KEY REFERENCES agent_messages(id) ON DELETE CASCADE,
    project_id UUID NOT NULL REFERENCES projects(id) ON DELETE CASCADE,
    -- expired | no_recipient | max_deliveries
    reason VARCHAR(32) NOT NULL,
    dead_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT NOW(),
    -- The message that retried it, once retried.
    retried_as UUID
);
CREATE INDEX idx_dead_letters_project ON dead_letters(project_id, dead_at);
