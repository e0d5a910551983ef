-- m2mgw module database on PostgreSQL, schema level 3: the key lifecycle the
-- gateway drives (see the SQLite migration of the same number).

-- The events a module's messages raised while it waited for approval.
CREATE TABLE held_events (
    held_id    BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    module_id  TEXT COLLATE "C" NOT NULL REFERENCES modules (module_id) ON DELETE CASCADE,
    kind       TEXT NOT NULL,
    app        TEXT COLLATE "C",
    payload    TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX held_events_module ON held_events (module_id, held_id);

-- The rotation job walks the active keys by module identity.
CREATE INDEX module_keys_active ON module_keys (module_id, kid) WHERE status = 'active';
-- ... and skips the modules with a keygen under way.
CREATE INDEX instructions_keygen ON instructions (module_id)
    WHERE kind = 'keygen' AND state IN ('queued', 'sent');
