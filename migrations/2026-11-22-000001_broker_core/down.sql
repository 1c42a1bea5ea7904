DROP TABLE agent_messages;
DROP TABLE sessions;
DROP TABLE projects;
