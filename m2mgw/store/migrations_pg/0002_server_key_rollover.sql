-- m2mgw module database on PostgreSQL, schema level 2: server key rollover
-- (see the SQLite migration of the same number).

ALTER TABLE server_keys ADD COLUMN retire_after BIGINT;

CREATE INDEX instructions_campaign ON instructions (source, idempotency_key, state)
    WHERE idempotency_key IS NOT NULL;
