CREATE TRIGGER tokenkeep_tombstone AFTER DELETE ON tokenkeep_tokens
BEGIN
    INSERT INTO tokenkeep_tombstones VALUES (old.provider, old.user_id, old.generation)
    ON CONFLICT (provider, user_id) DO UPDATE
    SET generation = max(generation, excluded.generation);
END
