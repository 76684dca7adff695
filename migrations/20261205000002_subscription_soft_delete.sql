-- Deleting a webhook subscription through the customer API marks it `deleted` instead
-- of removing the row, so its delivery history (webhook_deliveries and
-- webhook_attempts, which cascade on a row delete) stays listable. The relay delivers
-- to `active` subscriptions only. Forward-only, like every migration.

ALTER TABLE webhook_subscriptions
    DROP CONSTRAINT webhook_subscriptions_status_check,
    ADD CONSTRAINT webhook_subscriptions_status_check CHECK (status IN ('active', 'disabled', 'deleted')),
    ADD COLUMN deleted_at timestamptz;

-- The customer API lists an org's deliveries newest first, paginated by id.
CREATE INDEX webhook_deliveries_org_id ON webhook_deliveries (org_id, id);
