-- m2mgw module database on PostgreSQL, schema level 1 (the SQLite schema's
-- level 1 in PostgreSQL types).
--
-- Applied by m2mgw.store.postgres inside one transaction, under an advisory
-- lock, which also records the level in m2mgw_schema.  Times are integer
-- seconds since the epoch (BIGINT); binary values are BYTEA; enumerations are
-- stored as their string values.  Identities and application names sort in
-- code point order (COLLATE "C", byte order of UTF-8) as in SQLite.

CREATE TABLE modules (
    module_id     TEXT COLLATE "C" PRIMARY KEY,
    status        TEXT NOT NULL,
    psk           BYTEA,
    psk_reusable  BOOLEAN NOT NULL,
    module_group  TEXT COLLATE "C" NOT NULL,
    last_hello_ts BIGINT NOT NULL,
    created_at    BIGINT NOT NULL,
    -- the last iid assigned: iids are never reused
    last_iid      BIGINT NOT NULL DEFAULT 0,
    -- how many DATA toks were ever remembered: the next slot of data_tokens
    tokens_seen   BIGINT NOT NULL DEFAULT 0
);

CREATE TABLE module_keys (
    module_id    TEXT COLLATE "C" NOT NULL REFERENCES modules (module_id) ON DELETE CASCADE,
    kid          BIGINT NOT NULL,
    suite        TEXT NOT NULL,
    public       BYTEA NOT NULL,
    status       TEXT NOT NULL,
    vouched_by   BIGINT NOT NULL,
    created_at   BIGINT NOT NULL,
    activated_at BIGINT,
    retired_at   BIGINT,
    not_after    BIGINT,
    pid          BIGINT NOT NULL,
    PRIMARY KEY (module_id, kid)
);
CREATE INDEX module_keys_expiry ON module_keys (not_after)
    WHERE status IN ('active', 'pending') AND not_after IS NOT NULL;

CREATE TABLE server_keys (
    skid       BIGINT PRIMARY KEY,
    suite      TEXT NOT NULL,
    public     BYTEA NOT NULL,
    sig_public BYTEA,
    status     TEXT NOT NULL,
    created_at BIGINT NOT NULL
);

CREATE TABLE sessions (
    sid         BYTEA PRIMARY KEY,
    module_id   TEXT COLLATE "C" NOT NULL REFERENCES modules (module_id) ON DELETE CASCADE,
    kid         BIGINT NOT NULL,
    suite       TEXT NOT NULL,
    skid        BIGINT NOT NULL,
    k_up        BYTEA NOT NULL,
    k_down      BYTEA NOT NULL,
    created_at  BIGINT NOT NULL,
    expires_at  BIGINT NOT NULL,
    highest_ctr BIGINT NOT NULL,
    -- the replay bitmap, big-endian: a 64-counter window needs 64 bits
    "window"    BYTEA NOT NULL
);
CREATE INDEX sessions_module ON sessions (module_id);
CREATE INDEX sessions_expiry ON sessions (expires_at);

CREATE TABLE aliases (
    alias      BYTEA PRIMARY KEY,
    module_id  TEXT COLLATE "C" NOT NULL UNIQUE REFERENCES modules (module_id) ON DELETE CASCADE,
    expires_at BIGINT
);
CREATE INDEX aliases_expiry ON aliases (expires_at) WHERE expires_at IS NOT NULL;

-- The last DATA toks of each module with the outcome of their processing,
-- kept in a ring of slots (MGP/1 8.4).
CREATE TABLE data_tokens (
    module_id TEXT COLLATE "C" NOT NULL REFERENCES modules (module_id) ON DELETE CASCADE,
    slot      BIGINT NOT NULL,
    tok       BYTEA NOT NULL,
    outcome   BYTEA NOT NULL,
    PRIMARY KEY (module_id, slot)
);

CREATE TABLE instructions (
    module_id       TEXT COLLATE "C" NOT NULL REFERENCES modules (module_id) ON DELETE CASCADE,
    iid             BIGINT NOT NULL,
    kind            TEXT NOT NULL,
    body            BYTEA NOT NULL,
    wire_size       BIGINT NOT NULL,
    state           TEXT NOT NULL,
    not_after       BIGINT,
    attempts        BIGINT NOT NULL,
    source          TEXT NOT NULL,
    idempotency_key TEXT,
    created_at      BIGINT NOT NULL,
    updated_at      BIGINT NOT NULL,
    exec_ts         BIGINT,
    status          BIGINT,
    result          BYTEA,
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
    module_id TEXT COLLATE "C" NOT NULL REFERENCES modules (module_id) ON DELETE CASCADE,
    app       TEXT COLLATE "C" NOT NULL,
    PRIMARY KEY (module_id, app)
);

-- Per application: the last sequence number given and the last acknowledged.
-- Appending an event updates this row, which stays locked until the
-- transaction ends: sequence numbers are gapless and committed in order.
CREATE TABLE app_outbox (
    app       TEXT COLLATE "C" PRIMARY KEY,
    last_seq  BIGINT NOT NULL,
    acked_seq BIGINT NOT NULL
);

CREATE TABLE events (
    app        TEXT COLLATE "C" NOT NULL,
    seq        BIGINT NOT NULL,
    kind       TEXT NOT NULL,
    module_id  TEXT COLLATE "C",
    payload    TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (app, seq)
);

CREATE TABLE reports (
    report_id   BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    module_id   TEXT COLLATE "C" NOT NULL REFERENCES modules (module_id) ON DELETE CASCADE,
    received_at BIGINT NOT NULL,
    module_ts   BIGINT,
    data        BYTEA NOT NULL
);
CREATE INDEX reports_module ON reports (module_id, received_at, report_id);

CREATE TABLE security_events (
    event_id   BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at         BIGINT NOT NULL,
    category   TEXT NOT NULL,
    reason     TEXT NOT NULL,
    source     TEXT NOT NULL,
    claimed_id TEXT,
    detail     TEXT NOT NULL
);
CREATE INDEX security_events_at ON security_events (at, event_id);
