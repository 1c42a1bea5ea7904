-- Search documents are now made of the words the broker finds (src/domain/words.rs: runs of
-- letters and digits, lowercased) instead of PostgreSQL's `to_tsvector('simple', …)`, whose
-- parser cost about 20 µs of PostgreSQL's CPU per message and kept `config.yaml` or a path
-- as one word. Documents made the old way would not match the new queries: they are
-- dropped, and the search indexer writes every message's document again from seq 0. Until it
-- is done, a search indexes its own project's messages first, so nothing is missed.
TRUNCATE message_search, message_search_progress;
