-- Several brokers on one database. Each running broker is a node: it heartbeats its row,
-- records the WebSocket sessions it holds, and may hold duties (work done once per database).
-- A node whose heartbeat is older than its own `timeout_ms` is dead: any node deletes it,
-- which removes its sessions and frees its duties.

CREATE TABLE cluster_nodes (
    node_id VARCHAR(64) PRIMARY KEY,
    -- Where it listens, as it was started (`bind`) with the port it got.
    address VARCHAR(255) NOT NULL,
    started_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT NOW(),
    heartbeat_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT NOW(),
    -- How long without a heartbeat before the others declare it dead.
    timeout_ms BIGINT NOT NULL CHECK (timeout_ms > 0)
);

-- The live sessions of every node. At most one row per (project, agent): a new connection of
-- the agent replaces the row and takes a higher generation, which is how every node decides
-- which connection of an agent survives (the highest). Observers have no agent (NULL).
CREATE SEQUENCE cluster_session_generation;

CREATE TABLE cluster_sessions (
    session_id UUID PRIMARY KEY,
    node_id VARCHAR(64) NOT NULL REFERENCES cluster_nodes(node_id) ON DELETE CASCADE,
    project_id UUID NOT NULL REFERENCES projects(id) ON DELETE CASCADE,
    agent_id VARCHAR(255),
    generation BIGINT NOT NULL,
    connected_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT NOW()
);

CREATE UNIQUE INDEX cluster_sessions_agent ON cluster_sessions (project_id, agent_id);
CREATE INDEX cluster_sessions_node ON cluster_sessions (node_id);

-- Work done by one node per database: the dead-letter sweep of expired messages (`sweep`),
-- the search indexer (`search`), and taking over the request timeouts of nodes that left
-- (`timeouts`). A duty held by a node that is gone (or dead) is free.
CREATE TABLE cluster_duties (
    duty VARCHAR(32) PRIMARY KEY,
    node_id VARCHAR(64) REFERENCES cluster_nodes(node_id) ON DELETE SET NULL,
    acquired_at TIMESTAMP WITH TIME ZONE
);

INSERT INTO cluster_duties (duty) VALUES ('sweep'), ('search'), ('timeouts');
