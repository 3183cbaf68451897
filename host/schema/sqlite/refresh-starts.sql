-- Refresh-start records, in a file of their own (`<database>-refresh-starts`):
-- written while the row's transaction holds the main file's write lock, and
-- kept when that transaction rolls back.
CREATE TABLE IF NOT EXISTS tokenkeep_refresh_starts (
    provider TEXT NOT NULL,
    user_id TEXT NOT NULL,
    generation INTEGER NOT NULL,
    started_at INTEGER NOT NULL,
    PRIMARY KEY (provider, user_id)
) WITHOUT ROWID
