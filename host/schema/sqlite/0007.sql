-- Token events (see the Postgres migration 14): the outbox...
CREATE TABLE tokenkeep_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at INTEGER NOT NULL,
    provider TEXT NOT NULL,
    user_id TEXT NOT NULL,
    state TEXT NOT NULL,
    reason TEXT,
    generation INTEGER NOT NULL,
    conversations TEXT NOT NULL
)
