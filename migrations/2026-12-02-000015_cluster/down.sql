DROP TABLE cluster_duties;
DROP TABLE cluster_sessions;
DROP SEQUENCE cluster_session_generation;
DROP TABLE cluster_nodes;
