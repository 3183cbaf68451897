-- The scopes the user authorised (null: those the row holds).
ALTER TABLE tokenkeep_tokens ADD COLUMN baseline_scopes TEXT
