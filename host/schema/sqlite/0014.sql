-- A webhook's deliveries start after the events written before it
-- was first seen.
ALTER TABLE tokenkeep_webhook_leases ADD COLUMN start_after INTEGER NOT NULL DEFAULT 0
