-- Cheaper delivery bookkeeping. `delivered_at` is set once per message after it is stored;
-- when no index mentions that column and the page has room, PostgreSQL updates the row in
-- place (a HOT update) instead of adding an entry to every index.
DROP INDEX idx_agent_messages_expiring;
CREATE INDEX idx_agent_messages_expiring
    ON agent_messages(expires_at)
    WHERE expires_at IS NOT NULL;
ALTER TABLE agent_messages SET (fillfactor = 80);
