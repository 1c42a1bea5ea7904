-- Project tokens: what an agent (or a script) presents to use one project. Only a hash is
-- stored; the token itself is shown once, when it is issued.
CREATE TABLE tokens (
    id UUID PRIMARY KEY,
    project_id UUID NOT NULL REFERENCES projects(id) ON DELETE CASCADE,
    -- When set, the token speaks only as this agent.
    agent_id VARCHAR(255),
    -- SHA-256 of the token, hex.
    token_hash CHAR(64) NOT NULL UNIQUE,
    created_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT NOW(),
    revoked_at TIMESTAMP WITH TIME ZONE
);
CREATE INDEX idx_tokens_project ON tokens(project_id);
