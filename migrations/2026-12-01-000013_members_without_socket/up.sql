-- Members that call in without a socket (REST, MCP, the CLI): how each member last called in,
-- when it last called over HTTP (its presence), and how far it was told of new mail.

ALTER TABLE members
    -- 'websocket', 'rest' or 'mcp': how the member last called in. NULL: never (a member made
    -- by a direct message naming it).
    ADD COLUMN interface VARCHAR(16),
    -- The last REST/MCP call made as this agent: it counts as online for the presence interval.
    ADD COLUMN last_called_at TIMESTAMP WITH TIME ZONE,
    -- Owed messages with seq <= notified_seq were announced to the agent by the notifications
    -- route; distinct from the ack floor (being told is not being done).
    ADD COLUMN notified_seq BIGINT NOT NULL DEFAULT 0;
