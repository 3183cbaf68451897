CREATE TABLE tokenkeep_tokens (
    provider TEXT NOT NULL,
    user_id TEXT NOT NULL,
    key_id TEXT NOT NULL,
    access_token BLOB NOT NULL,
    refresh_token BLOB,
    access_token_expires_at INTEGER,
    refresh_token_expires_at INTEGER,
    scopes TEXT NOT NULL,
    obtained_at INTEGER NOT NULL,
    generation INTEGER NOT NULL,
    failed_attempts INTEGER NOT NULL DEFAULT 0,
    last_failure_at INTEGER,
    last_failure TEXT,
    last_success_at INTEGER,
    refresh_started_at INTEGER,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (provider, user_id)
) WITHOUT ROWID
