-- The broker core: projects (each with its own dense message sequence), one row per WebSocket
-- connection, and the spec's agent_messages table extended for ordering, routing and idempotency.

CREATE TABLE projects (
    id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    name VARCHAR(255) NOT NULL,
    -- The last seq handed out in this project. Bumped inside the same transaction as the insert
    -- of the messages that use the numbers, so a rolled-back batch gives them back: seqs stay
    -- dense (1, 2, 3, ...) and their order is commit order.
    head_seq BIGINT NOT NULL DEFAULT 0,
    created_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT NOW()
);

CREATE TABLE sessions (
    id UUID PRIMARY KEY,
    project_id UUID NOT NULL REFERENCES projects(id) ON DELETE CASCADE,
    agent_id VARCHAR(255) NOT NULL,
    agent_type VARCHAR(50) NOT NULL,
    connected_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT NOW(),
    disconnected_at TIMESTAMP WITH TIME ZONE
);

CREATE INDEX idx_sessions_project_agent ON sessions(project_id, agent_id);

CREATE TABLE agent_messages (
    id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    project_id UUID NOT NULL REFERENCES projects(id) ON DELETE CASCADE,

    -- Sender
    sender_agent_id VARCHAR(255) NOT NULL,
    sender_agent_type VARCHAR(50) NOT NULL,
    sender_session_id UUID REFERENCES sessions(id) ON DELETE SET NULL,

    -- Content
    message_type VARCHAR(50) NOT NULL,
    content TEXT NOT NULL,
    metadata JSONB NOT NULL DEFAULT '{}',

    -- Delivery
    delivered_at TIMESTAMP WITH TIME ZONE,
    read_at TIMESTAMP WITH TIME ZONE,

    created_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT NOW(),

    -- Extensions over the spec.
    seq BIGINT NOT NULL,
    recipient_agent_id VARCHAR(255),
    priority SMALLINT NOT NULL DEFAULT 2 CHECK (priority BETWEEN 0 AND 3),
    correlation_id VARCHAR(255),
    reply_to UUID,
    expires_at TIMESTAMP WITH TIME ZONE,
    client_msg_id VARCHAR(64),

    CONSTRAINT agent_messages_project_seq_key UNIQUE (project_id, seq)
);

CREATE INDEX idx_agent_messages_project ON agent_messages(project_id, created_at DESC);
CREATE INDEX idx_agent_messages_type ON agent_messages(message_type);
-- A retried send (same client_msg_id from the same sender in the same project) is stored once.
CREATE UNIQUE INDEX idx_agent_messages_client_msg_id
    ON agent_messages(project_id, sender_agent_id, client_msg_id)
    WHERE client_msg_id IS NOT NULL;
