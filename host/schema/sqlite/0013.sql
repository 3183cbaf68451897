-- Refusals announced before the column existed.
UPDATE tokenkeep_tokens SET announced_state = 'reauthorization-required'
WHERE last_failure = 'reauthorization-required'
