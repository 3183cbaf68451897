CREATE TRIGGER tokenkeep_event_fresh AFTER UPDATE ON tokenkeep_tokens
WHEN NEW.generation <> OLD.generation
    AND NEW.last_failure IS NULL
    AND OLD.last_failure IS NOT 'reauthorization-required'
    AND (OLD.announced_state = 'refresh-due'
        OR (OLD.announced_state = 'refresh-token-expiring'
            AND NEW.refresh_token_expires_at IS NOT OLD.refresh_token_expires_at))
BEGIN
    INSERT INTO tokenkeep_events
        (at, provider, user_id, state, reason, generation, conversations)
    VALUES (unixepoch(), NEW.provider, NEW.user_id, 'fresh', NULL, NEW.generation, (SELECT json_group_array(conversation_id) FROM (SELECT conversation_id
            FROM tokenkeep_conversations WHERE provider = NEW.provider
            AND user_id = NEW.user_id ORDER BY conversation_id)));
    UPDATE tokenkeep_tokens SET announced_state = 'fresh'
    WHERE provider = NEW.provider AND user_id = NEW.user_id;
END
