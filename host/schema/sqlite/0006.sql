-- When the provider may be asked again after a failure.
ALTER TABLE tokenkeep_tokens ADD COLUMN retry_not_before INTEGER
