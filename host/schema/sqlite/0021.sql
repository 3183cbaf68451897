-- Clients registered with a discovered authorisation server (RFC 7591), one
-- per provider, shared by every host of the database: an MCP server's
-- tokens are bound to the client that got them. Public clients: no secret.
CREATE TABLE tokenkeep_clients (
    provider TEXT PRIMARY KEY,
    resource TEXT NOT NULL,
    metadata TEXT NOT NULL,
    client_id TEXT NOT NULL,
    registered_at BIGINT NOT NULL
);
