-- Manual-ack deliveries not acknowledged yet: how often each was delivered to each agent, so
-- that a message no client ever acknowledges ends in the dead-letter list instead of being
-- delivered forever.
CREATE TABLE delivery_attempts (
    project_id UUID NOT NULL REFERENCES projects(id) ON DELETE CASCADE,
    agent_id VARCHAR(255) NOT NULL,
    seq BIGINT NOT NULL,
    attempts INTEGER NOT NULL,
    PRIMARY KEY (project_id, agent_id, seq)
);
