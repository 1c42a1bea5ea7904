-- Less work per stored message.

-- Every `delivered_at` (and `read_at`) update of a message row is HOT. An update writes a new
-- version of the row, and it is HOT (no index touched, the old version pruned in place) only
-- if the new version fits on the same page. With `fillfactor = 80` a page of ~450-byte rows
-- had room for about a quarter of its rows' new versions: three updates in four went to
-- another page with a new entry in every index (24 µs a row of PostgreSQL time, measured on
-- 500-row deliveries). At 50 the page keeps room for each row's one update: every update is
-- HOT (8 µs a row). The price is disk: with autovacuum reclaiming the moved versions, a heap
-- at 80 reuses the room they leave while a heap at 50 keeps half of each page free, about
-- 2.4 times the heap for the same rows (docs/PERFORMANCE.md, third round, second sitting);
-- the indexes are half the size. Applies to pages written from now on.
ALTER TABLE agent_messages SET (fillfactor = 50);

-- Indexes written for every stored message, each now named by the query that reads it.
-- (project_id, created_at DESC) was read by none: within a project seq order is commit
-- order, so (project_id, seq) serves "the latest messages of a project". (message_type) was
-- read by the history's type filter, through a bitmap scan of every row of that type in all
-- projects followed by a sort; (project_id, message_type, seq) is one entry a message too, and
-- reads a project's rows of one type already in seq order, stopping at the page's end.
DROP INDEX idx_agent_messages_project;
DROP INDEX idx_agent_messages_type;
CREATE INDEX idx_agent_messages_project_type ON agent_messages(project_id, message_type, seq);
