-- m2mgw module database, schema level 1.
--
-- Applied by m2mgw.store.sqlite inside one transaction, which also sets
-- PRAGMA user_version = 1.  Times are integer seconds since the epoch; binary
-- values are BLOBs; enumerations are stored as their string values.

CREATE TABLE modules (
    module_id     TEXT PRIMARY KEY,
    status        TEXT NOT NULL,
    psk           BLOB,
    psk_reusable  INTEGER NOT NULL,
    module_group  TEXT NOT NULL,
    last_hello_ts INTEGER NOT NULL,
    created_at    INTEGER NOT NULL,
    -- the last iid assigned: iids are never reused
    last_iid      INTEGER NOT NULL DEFAULT 0,
    -- how many DATA toks were ever remembered: the next slot of data_tokens
    tokens_seen   INTEGER NOT NULL DEFAULT 0
);

CREATE TABLE module_keys (
    module_id    TEXT NOT NULL REFERENCES modules (module_id) ON DELETE CASCADE,
    kid          INTEGER NOT NULL,
    suite        TEXT NOT NULL,
    public       BLOB NOT NULL,
    status       TEXT NOT NULL,
    vouched_by   INTEGER NOT NULL,
    created_at   INTEGER NOT NULL,
    activated_at INTEGER,
    retired_at   INTEGER,
    not_after    INTEGER,
    pid          INTEGER NOT NULL,
    PRIMARY KEY (module_id, kid)
);
CREATE INDEX module_keys_expiry ON module_keys (not_after)
    WHERE status IN ('active', 'pending') AND not_after IS NOT NULL;

CREATE TABLE server_keys (
    skid       INTEGER PRIMARY KEY,
    suite      TEXT NOT NULL,
    public     BLOB NOT NULL,
    sig_public BLOB,
    status     TEXT NOT NULL,
    created_at INTEGER NOT NULL
);

CREATE TABLE sessions (
    sid         BLOB PRIMARY KEY,
    module_id   TEXT NOT NULL REFERENCES modules (module_id) ON DELETE CASCADE,
    kid         INTEGER NOT NULL,
    suite       TEXT NOT NULL,
    skid        INTEGER NOT NULL,
    k_up        BLOB NOT NULL,
    k_down      BLOB NOT NULL,
    created_at  INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL,
    highest_ctr INTEGER NOT NULL,
    -- the replay bitmap, big-endian: a 64-counter window needs 64 bits
    window      BLOB NOT NULL
);
CREATE INDEX sessions_module ON sessions (module_id);
CREATE INDEX sessions_expiry ON sessions (expires_at);

CREATE TABLE aliases (
    alias      BLOB PRIMARY KEY,
    module_id  TEXT NOT NULL UNIQUE REFERENCES modules (module_id) ON DELETE CASCADE,
    expires_at INTEGER
);
CREATE INDEX aliases_expiry ON aliases (expires_at) WHERE expires_at IS NOT NULL;

-- The last DATA toks of each module with the outcome of their processing,
-- kept in a ring of slots (MGP/1 8.4).
CREATE TABLE data_tokens (
    module_id TEXT NOT NULL REFERENCES modules (module_id) ON DELETE CASCADE,
    slot      INTEGER NOT NULL,
    tok       BLOB NOT NULL,
    outcome   BLOB NOT NULL,
    PRIMARY KEY (module_id, slot)
);

CREATE TABLE instructions (
    module_id       TEXT NOT NULL REFERENCES modules (module_id) ON DELETE CASCADE,
    iid             INTEGER NOT NULL,
    kind            TEXT NOT NULL,
    body            BLOB NOT NULL,
    wire_size       INTEGER NOT NULL,
    state           TEXT NOT NULL,
    not_after       INTEGER,
    attempts        INTEGER NOT NULL,
    source          TEXT NOT NULL,
    idempotency_key TEXT,
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL,
    exec_ts         INTEGER,
    status          INTEGER,
    result          BLOB,
    PRIMARY KEY (module_id, iid)
);
-- The pending instructions of a module, oldest first (every accepted datagram).
CREATE INDEX instructions_pending ON instructions (module_id, iid)
    WHERE state IN ('queued', 'sent');
CREATE INDEX instructions_expiry ON instructions (not_after)
    WHERE state IN ('queued', 'sent') AND not_after IS NOT NULL;
CREATE UNIQUE INDEX instructions_idempotency ON instructions (module_id, source, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX instructions_created ON instructions (created_at, module_id, iid);

CREATE TABLE module_apps (
    module_id TEXT NOT NULL REFERENCES modules (module_id) ON DELETE CASCADE,
    app       TEXT NOT NULL,
    PRIMARY KEY (module_id, app)
);

-- Per application: the last sequence number given and the last acknowledged.
CREATE TABLE app_outbox (
    app       TEXT PRIMARY KEY,
    last_seq  INTEGER NOT NULL,
    acked_seq INTEGER NOT NULL
);

CREATE TABLE events (
    app        TEXT NOT NULL,
    seq        INTEGER NOT NULL,
    kind       TEXT NOT NULL,
    module_id  TEXT,
    payload    TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (app, seq)
);

CREATE TABLE reports (
    report_id   INTEGER PRIMARY KEY,
    module_id   TEXT NOT NULL REFERENCES modules (module_id) ON DELETE CASCADE,
    received_at INTEGER NOT NULL,
    module_ts   INTEGER,
    data        BLOB NOT NULL
);
CREATE INDEX reports_module ON reports (module_id, received_at, report_id);

CREATE TABLE security_events (
    event_id   INTEGER PRIMARY KEY,
    at         INTEGER NOT NULL,
    category   TEXT NOT NULL,
    reason     TEXT NOT NULL,
    source     TEXT NOT NULL,
    claimed_id TEXT,
    detail     TEXT NOT NULL
);
CREATE INDEX security_events_at ON security_events (at, event_id);
