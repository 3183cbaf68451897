-- The last generation of each deleted row: a new row for the same
-- provider and user continues after it.
CREATE TABLE tokenkeep_tombstones (
    provider TEXT NOT NULL,
    user_id TEXT NOT NULL,
    generation INTEGER NOT NULL,
    PRIMARY KEY (provider, user_id)
) WITHOUT ROWID
