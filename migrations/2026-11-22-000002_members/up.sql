-- Membership and durable delivery cursors: what each agent of a project has been given.

CREATE TABLE members (
    project_id UUID NOT NULL REFERENCES projects(id) ON DELETE CASCADE,
    agent_id VARCHAR(255) NOT NULL,
    agent_type VARCHAR(50) NOT NULL,
    -- Every message visible to this agent with seq <= ack_floor is done (delivered in auto
    -- mode, acknowledged in manual mode, or expired).
    ack_floor BIGINT NOT NULL DEFAULT 0,
    -- Done seqs above the floor (acknowledged out of order), ascending.
    acked_above BIGINT[] NOT NULL DEFAULT '{}',
    -- Broadcasts with seq <= joined_seq predate the agent's first connection and are not owed
    -- to it. NULL until it first connects (a member made by a direct message naming it).
    joined_seq BIGINT,
    -- The connection whose progress counts; progress reported by a replaced connection is
    -- ignored.
    current_session_id UUID,
    last_seen_at TIMESTAMP WITH TIME ZONE,
    created_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT NOW(),
    PRIMARY KEY (project_id, agent_id)
);

-- Direct messages of one recipient, for replay and inboxes.
CREATE INDEX idx_agent_messages_recipient
    ON agent_messages(project_id, recipient_agent_id, seq)
    WHERE recipient_agent_id IS NOT NULL;
