CREATE INDEX tokenkeep_events_at ON tokenkeep_events (at)
