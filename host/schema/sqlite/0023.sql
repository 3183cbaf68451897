-- DPoP proof keys (RFC 9449): one per token row of a provider that binds
-- its tokens, made by the host before the first request that needs it and
-- never replaced (tokens are bound to it). Sealed like the tokens, under
-- a label no provider name can be. Deleted with the row: a reconnect after
-- a delete gets a new key.
CREATE TABLE tokenkeep_proof_keys (
    provider TEXT NOT NULL,
    user_id TEXT NOT NULL,
    key_id TEXT NOT NULL,
    sealed BLOB NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (provider, user_id)
);
