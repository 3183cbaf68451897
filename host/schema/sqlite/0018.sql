-- The events a write decides, in its transaction, and the state
-- they announce. (The nested updates change only the announced
-- state, which none of these triggers watch.)
CREATE TRIGGER tokenkeep_event_reauthorization AFTER UPDATE ON tokenkeep_tokens
WHEN NEW.last_failure = 'reauthorization-required'
    AND OLD.last_failure IS NOT 'reauthorization-required'
BEGIN
    INSERT INTO tokenkeep_events
        (at, provider, user_id, state, reason, generation, conversations)
    SELECT unixepoch(), NEW.provider, NEW.user_id, 'reauthorization-required',
        NEW.last_failure, NEW.generation, (SELECT json_group_array(conversation_id) FROM (SELECT conversation_id
            FROM tokenkeep_conversations WHERE provider = NEW.provider
            AND user_id = NEW.user_id ORDER BY conversation_id))
    WHERE OLD.announced_state IS NOT 'reauthorization-required';
    UPDATE tokenkeep_tokens SET announced_state = 'reauthorization-required'
    WHERE provider = NEW.provider AND user_id = NEW.user_id;
END
