-- The audit log, in a file of its own (`<database>-audit`): its writes
-- neither wait for the tokens' write lock nor move the main file's change
-- counter.
CREATE TABLE IF NOT EXISTS tokenkeep_audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at INTEGER NOT NULL,
    caller TEXT NOT NULL,
    action TEXT NOT NULL,
    provider TEXT NOT NULL,
    user_id TEXT NOT NULL,
    generation INTEGER,
    outcome TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS tokenkeep_audit_at ON tokenkeep_audit (at);
CREATE INDEX IF NOT EXISTS tokenkeep_audit_row ON tokenkeep_audit (provider, user_id, id);
