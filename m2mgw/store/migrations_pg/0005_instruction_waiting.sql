-- m2mgw module database on PostgreSQL, schema level 5: the instruction state
-- 'waiting' (see the SQLite migration of the same number): the partial
-- indexes over the pending instructions take it in.

DROP INDEX instructions_pending;
CREATE INDEX instructions_pending ON instructions (module_id, iid)
    WHERE state IN ('queued', 'waiting', 'sent');

DROP INDEX instructions_expiry;
CREATE INDEX instructions_expiry ON instructions (not_after)
    WHERE state IN ('queued', 'waiting', 'sent') AND not_after IS NOT NULL;

DROP INDEX instructions_keygen;
CREATE INDEX instructions_keygen ON instructions (module_id)
    WHERE kind = 'keygen' AND state IN ('queued', 'waiting', 'sent');
