ALTER TABLE agent_messages RESET (fillfactor);
DROP INDEX idx_agent_messages_expiring;
CREATE INDEX idx_agent_messages_expiring
    ON agent_messages(expires_at)
    WHERE expires_at IS NOT NULL AND delivered_at IS NULL;
