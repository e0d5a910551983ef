-- m2mgw module database on PostgreSQL, schema level 6: retention (as in SQLite).
--
-- The expiry job deletes reports, security events and finished instructions
-- older than the [store] keep_* settings, oldest first and a bounded number
-- at a time.  Reports and security events are found through their primary
-- key and their time index; finished instructions get an index of their own.

CREATE INDEX instructions_finished ON instructions (updated_at)
    WHERE state IN ('confirmed', 'failed', 'expired', 'cancelled');
