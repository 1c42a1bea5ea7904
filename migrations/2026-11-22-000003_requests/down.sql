DROP TABLE dead_letters;
ALTER TABLE members DROP COLUMN capabilities, DROP COLUMN description;
DROP INDEX idx_agent_messages_expiring;
DROP INDEX idx_agent_messages_content_search;
DROP INDEX idx_agent_messages_reply_to;
DROP INDEX idx_agent_messages_correlation;
DROP INDEX idx_agent_messages_pending_requests;
ALTER TABLE agent_messages
    DROP COLUMN recipient_agent_type, DROP COLUMN expects_reply, DROP COLUMN reply_deadline,
    DROP COLUMN replied_at, DROP COLUMN in_reply_to_seq, DROP COLUMN success, DROP COLUMN error,
    DROP COLUMN duration_ms, DROP COLUMN late;
