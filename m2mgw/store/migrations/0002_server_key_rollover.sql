-- m2mgw module database, schema level 2: server key rollover.
--
-- A retiring server key may carry a deadline after which it is retired even
-- if some modules told about its successor never confirmed; and the progress
-- of an announcement (the skey instructions queued for every module under one
-- idempotency key) is counted by state without scanning every instruction.

ALTER TABLE server_keys ADD COLUMN retire_after INTEGER;

CREATE INDEX instructions_campaign ON instructions (source, idempotency_key, state)
    WHERE idempotency_key IS NOT NULL;
