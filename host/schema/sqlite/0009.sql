-- ...one deliverer per webhook at a time...
CREATE TABLE tokenkeep_webhook_leases (
    webhook TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    until INTEGER NOT NULL
) WITHOUT ROWID
