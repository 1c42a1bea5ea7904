DROP TABLE coordination_outbox;
DROP TABLE tasks;
ALTER TABLE agent_messages DROP COLUMN task;
DROP TABLE claim_objections;
DROP TABLE claims;
