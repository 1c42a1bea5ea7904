-- Coordination: file claims (leases on paths, with optional objection windows), tasks that
-- exactly one agent takes, and the outbox of the broker's coordination messages.

-- A claim on paths of the project's tree. Its state changes only by conditional UPDATEs
-- (`... WHERE state = 'pending' ...`), so each decision is taken exactly once.
CREATE TABLE claims (
    id UUID PRIMARY KEY,
    project_id UUID NOT NULL REFERENCES projects(id) ON DELETE CASCADE,
    agent_id VARCHAR(255) NOT NULL,
    -- Normalised path patterns (exact paths and globs), relative to the repository root.
    paths TEXT[] NOT NULL,
    shared BOOLEAN NOT NULL,
    reason TEXT,
    -- pending | granted | refused | objected | released | expired
    state VARCHAR(16) NOT NULL,
    -- How long the claim lasts once granted (and after each renewal).
    ttl_ms BIGINT NOT NULL,
    created_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT now(),
    -- The end of the objection window (a claim that asked for one).
    decide_at TIMESTAMP WITH TIME ZONE,
    granted_at TIMESTAMP WITH TIME ZONE,
    -- Held until this moment (granted claims); never reported held after it.
    expires_at TIMESTAMP WITH TIME ZONE,
    -- When it stopped: refused, objected, released or expired.
    ended_at TIMESTAMP WITH TIME ZONE,
    -- Who ended it (the objector, or who released it) and why.
    ended_by VARCHAR(255),
    end_reason TEXT,
    -- The latest notice about it (its message's client_msg_id), to find that message's seq.
    notice_id UUID,
    CONSTRAINT claims_state CHECK (state IN ('pending', 'granted', 'refused', 'objected', 'released', 'expired'))
);
-- The claims that can still conflict, per project.
CREATE INDEX idx_claims_active ON claims(project_id) WHERE state IN ('pending', 'granted');
CREATE INDEX idx_claims_history ON claims(project_id, created_at);

CREATE TABLE claim_objections (
    claim_id UUID NOT NULL REFERENCES claims(id) ON DELETE CASCADE,
    agent_id VARCHAR(255) NOT NULL,
    reason TEXT NOT NULL,
    created_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT now(),
    PRIMARY KEY (claim_id, agent_id)
);

-- A message sent with "task": true. Its row is inserted in the transaction that stores the
-- message; every later change is a conditional UPDATE (`... WHERE state = 'open' ...`), so
-- the first claim wins and every deadline fires once.
ALTER TABLE agent_messages ADD COLUMN task BOOLEAN NOT NULL DEFAULT false;

CREATE TABLE tasks (
    message_id UUID PRIMARY KEY REFERENCES agent_messages(id) ON DELETE CASCADE,
    project_id UUID NOT NULL REFERENCES projects(id) ON DELETE CASCADE,
    -- open | claimed | done | failed | canceled | unclaimed
    state VARCHAR(16) NOT NULL DEFAULT 'open',
    -- The agent that holds it (claimed), or finished it (done, failed).
    holder VARCHAR(255),
    claim_timeout_ms BIGINT,
    work_timeout_ms BIGINT,
    -- Open: dead-lettered as `unclaimed` if nobody claims it by then.
    claim_deadline TIMESTAMP WITH TIME ZONE,
    -- Claimed: open again if not finished by then.
    work_deadline TIMESTAMP WITH TIME ZONE,
    claimed_at TIMESTAMP WITH TIME ZONE,
    closed_at TIMESTAMP WITH TIME ZONE,
    -- The holder's result (done) or error (failed), or why it was canceled.
    result TEXT,
    -- How many times it was offered: 1, plus one each time it became open again.
    offers INTEGER NOT NULL DEFAULT 1,
    updated_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT now(),
    CONSTRAINT tasks_state CHECK (state IN ('open', 'claimed', 'done', 'failed', 'canceled', 'unclaimed'))
);
CREATE INDEX idx_tasks_project_state ON tasks(project_id, state);

-- The broker's coordination messages, written in the transaction that decides what they
-- report, then stored as ordinary messages (sender `agentbus`, `client_msg_id` = id, so a
-- message is stored once however often it is handed over) and deleted. Rows left by a
-- crash are stored at the next start.
CREATE TABLE coordination_outbox (
    id UUID PRIMARY KEY,
    project_id UUID NOT NULL REFERENCES projects(id) ON DELETE CASCADE,
    -- to, to_type, content, metadata, priority, reply_to, success, error
    message JSONB NOT NULL,
    created_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT clock_timestamp()
);
