-- ...deliveries per webhook...
CREATE TABLE tokenkeep_deliveries (
    webhook TEXT NOT NULL,
    event_id INTEGER NOT NULL,
    delivered_at INTEGER NOT NULL,
    PRIMARY KEY (webhook, event_id)
) WITHOUT ROWID
