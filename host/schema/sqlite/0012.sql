-- The state last announced for the row (see `events`): null until
-- one is, which stands for fresh.
ALTER TABLE tokenkeep_tokens ADD COLUMN announced_state TEXT
