CREATE TRIGGER tokenkeep_event_recovered AFTER UPDATE ON tokenkeep_tokens
WHEN NEW.last_failure IS NOT 'reauthorization-required'
    AND (OLD.last_failure = 'reauthorization-required'
        OR (OLD.announced_state = 'reauthorization-required'
            AND NEW.generation <> OLD.generation))
BEGIN
    INSERT INTO tokenkeep_events
        (at, provider, user_id, state, reason, generation, conversations)
    VALUES (unixepoch(), NEW.provider, NEW.user_id, 'recovered', NEW.last_failure,
        NEW.generation, (SELECT json_group_array(conversation_id) FROM (SELECT conversation_id
            FROM tokenkeep_conversations WHERE provider = NEW.provider
            AND user_id = NEW.user_id ORDER BY conversation_id)));
    UPDATE tokenkeep_tokens SET announced_state = NULL
    WHERE provider = NEW.provider AND user_id = NEW.user_id;
END
