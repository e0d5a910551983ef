-- m2mgw module database, schema level 5: the instruction state 'waiting'.
--
-- An instruction is 'waiting' when its module was heard from without it
-- riding in the reply (no room left, or the module waits for approval).  It
-- is still pending: the partial indexes over the pending instructions take
-- it in, so that the per-datagram query keeps using them.

DROP INDEX instructions_pending;
CREATE INDEX instructions_pending ON instructions (module_id, iid)
    WHERE state IN ('queued', 'waiting', 'sent');

DROP INDEX instructions_expiry;
CREATE INDEX instructions_expiry ON instructions (not_after)
    WHERE state IN ('queued', 'waiting', 'sent') AND not_after IS NOT NULL;

DROP INDEX instructions_keygen;
CREATE INDEX instructions_keygen ON instructions (module_id)
    WHERE kind = 'keygen' AND state IN ('queued', 'waiting', 'sent');
