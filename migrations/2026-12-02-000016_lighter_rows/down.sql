DROP INDEX idx_agent_messages_project_type;
CREATE INDEX idx_agent_messages_type ON agent_messages(message_type);
CREATE INDEX idx_agent_messages_project ON agent_messages(project_id, created_at DESC);
ALTER TABLE agent_messages SET (fillfactor = 80);
