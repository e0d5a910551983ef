-- m2mgw module database, schema level 3: the key lifecycle the gateway drives.

-- The events a module's messages raised while it waited for approval
-- (status pending-approval): appended to its applications' outboxes, in
-- this order, when it is approved; forgotten when it is refused.
CREATE TABLE held_events (
    held_id    INTEGER PRIMARY KEY,
    module_id  TEXT NOT NULL REFERENCES modules (module_id) ON DELETE CASCADE,
    kind       TEXT NOT NULL,
    app        TEXT,
    payload    TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE INDEX held_events_module ON held_events (module_id, held_id);

-- The rotation job walks the active keys by module identity.
CREATE INDEX module_keys_active ON module_keys (module_id, kid) WHERE status = 'active';
-- ... and skips the modules with a keygen under way.
CREATE INDEX instructions_keygen ON instructions (module_id)
    WHERE kind = 'keygen' AND state IN ('queued', 'sent');
