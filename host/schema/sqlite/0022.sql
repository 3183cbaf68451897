-- Sealed authorisation states already completed (the service's connect):
-- each completes once, until it expires. Nothing secret: a random id.
CREATE TABLE tokenkeep_authorizations (
    id TEXT PRIMARY KEY,
    expires_at BIGINT NOT NULL
);
