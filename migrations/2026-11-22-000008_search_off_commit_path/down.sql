DROP TABLE message_search_progress;
DROP TABLE message_search;
CREATE INDEX idx_agent_messages_content_search
    ON agent_messages USING GIN (to_tsvector('simple', content));
