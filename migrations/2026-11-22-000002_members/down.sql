DROP INDEX idx_agent_messages_recipient;
DROP TABLE members;
