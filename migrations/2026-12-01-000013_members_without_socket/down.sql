ALTER TABLE members
    DROP COLUMN notified_seq,
    DROP COLUMN last_called_at,
    DROP COLUMN interface;
