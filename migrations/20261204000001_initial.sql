-- Initial schema of Reach Fleet. Migrations are forward-only: a change to a released
-- schema is a new migration, never an edit of this file.

CREATE SCHEMA IF NOT EXISTS platform;

-- Tenants and their WhatsApp Business Accounts ---------------------------------------

CREATE TABLE orgs (
    id          uuid PRIMARY KEY,
    slug        text NOT NULL UNIQUE,
    name        text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE wabas (
    waba_id             text PRIMARY KEY,
    org_id              uuid NOT NULL REFERENCES orgs (id),
    -- Sealed with the configured secrets mode; never returned by any API.
    access_token_sealed text NOT NULL,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX wabas_org_id ON wabas (org_id);

CREATE TABLE phone_numbers (
    phone_number_id      text PRIMARY KEY,
    org_id               uuid NOT NULL REFERENCES orgs (id),
    waba_id              text NOT NULL REFERENCES wabas (waba_id),
    display_phone_number text NOT NULL,
    -- The display number with everything but digits removed, for matching quality
    -- updates that name a number only by its display number.
    display_digits       text NOT NULL,
    mps                  integer NOT NULL DEFAULT 80 CHECK (mps > 0),
    quality_rating       text NOT NULL DEFAULT 'UNKNOWN'
                         CHECK (quality_rating IN ('GREEN', 'YELLOW', 'RED', 'UNKNOWN')),
    created_at           timestamptz NOT NULL DEFAULT now(),
    updated_at           timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX phone_numbers_org_id ON phone_numbers (org_id);
CREATE INDEX phone_numbers_waba_display ON phone_numbers (waba_id, display_digits);

-- Inbound webhooks ----------------------------------------------------------------------

-- Every authentic POST from Meta, byte for byte. One body can carry entries of several
-- WABAs and so of several orgs, which is why this table has no org_id; the events
-- derived from it do.
CREATE TABLE inbound_webhooks (
    id               bigserial PRIMARY KEY,
    received_at      timestamptz NOT NULL DEFAULT now(),
    body_sha256      bytea NOT NULL UNIQUE,
    body             bytea NOT NULL,
    outcome          text NOT NULL
                     CHECK (outcome IN ('accepted', 'partially_unroutable', 'unroutable', 'unparseable')),
    parse_error      text,
    event_count      integer NOT NULL DEFAULT 0,
    unroutable_count integer NOT NULL DEFAULT 0
);
CREATE INDEX inbound_webhooks_received_at ON inbound_webhooks (received_at);
CREATE INDEX inbound_webhooks_problems ON inbound_webhooks (outcome, received_at)
    WHERE outcome <> 'accepted';

-- One normalised event per item of every change. The id is the Standard Webhooks
-- `webhook-id` of every callback made for it.
CREATE TABLE events (
    id                 uuid PRIMARY KEY,
    org_id             uuid NOT NULL REFERENCES orgs (id),
    type               text NOT NULL,
    -- What makes two events the same fact, for example `status:{wamid}:{status}`.
    dedup_key          text NOT NULL,
    phone_number_id    text,
    inbound_webhook_id bigint REFERENCES inbound_webhooks (id),
    data               jsonb NOT NULL,
    created_at         timestamptz NOT NULL,
    UNIQUE (org_id, dedup_key)
);
CREATE INDEX events_org_created ON events (org_id, created_at);

-- The state of each message known by wamid. Statuses only move it forward:
-- sent (1) < delivered (2) < read (3); failed (4) is terminal.
CREATE TABLE messages (
    org_id          uuid NOT NULL REFERENCES orgs (id),
    wamid           text NOT NULL,
    phone_number_id text NOT NULL,
    status          text NOT NULL CHECK (status IN ('sent', 'delivered', 'read', 'failed')),
    status_rank     smallint NOT NULL,
    error_code      integer,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (org_id, wamid)
);

-- Transactional outbox ------------------------------------------------------------------

CREATE TABLE outbox (
    id            bigserial PRIMARY KEY,
    org_id        uuid,
    -- Logical destination (`event` or `send`); the publisher maps it to an exchange.
    topic         text NOT NULL,
    routing_key   text NOT NULL,
    message_id    uuid NOT NULL,
    payload       bytea NOT NULL,
    state         text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'dispatched', 'failed')),
    attempts      integer NOT NULL DEFAULT 0,
    last_error    text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    available_at  timestamptz NOT NULL DEFAULT now(),
    dispatched_at timestamptz
) WITH (fillfactor = 80, autovacuum_vacuum_scale_factor = 0.02, autovacuum_vacuum_insert_scale_factor = 0.05);
CREATE INDEX outbox_pending ON outbox (available_at, id) WHERE state = 'pending';
CREATE INDEX outbox_dispatched ON outbox (dispatched_at) WHERE state = 'dispatched';
CREATE INDEX outbox_failed ON outbox (id) WHERE state = 'failed';

-- Customer webhook subscriptions and deliveries --------------------------------------

CREATE TABLE webhook_subscriptions (
    id              uuid PRIMARY KEY,
    org_id          uuid NOT NULL REFERENCES orgs (id),
    url             text NOT NULL,
    -- Event types, or the single element `*` for every type.
    event_types     text[] NOT NULL,
    status          text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'disabled')),
    disabled_reason text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX webhook_subscriptions_org ON webhook_subscriptions (org_id) WHERE status = 'active';

-- Signing secrets; during a rotation the old one stays active until expires_at.
CREATE TABLE webhook_subscription_secrets (
    id              bigserial PRIMARY KEY,
    org_id          uuid NOT NULL REFERENCES orgs (id),
    subscription_id uuid NOT NULL REFERENCES webhook_subscriptions (id) ON DELETE CASCADE,
    secret_sealed   text NOT NULL,
    -- SHA-256 of the plain secret, so provisioning can tell a known secret without
    -- unsealing every stored one.
    secret_sha256   bytea NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    expires_at      timestamptz,
    UNIQUE (subscription_id, secret_sha256)
);

CREATE TABLE webhook_deliveries (
    id               bigserial PRIMARY KEY,
    org_id           uuid NOT NULL REFERENCES orgs (id),
    event_id         uuid NOT NULL REFERENCES events (id),
    subscription_id  uuid NOT NULL REFERENCES webhook_subscriptions (id) ON DELETE CASCADE,
    status           text NOT NULL CHECK (status IN ('pending', 'delivered', 'parked')),
    attempt_count    integer NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz,
    last_status_code integer,
    last_error       text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    delivered_at     timestamptz,
    parked_at        timestamptz,
    UNIQUE (event_id, subscription_id)
) WITH (fillfactor = 85);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at) WHERE status = 'pending';
CREATE INDEX webhook_deliveries_parked ON webhook_deliveries (org_id, parked_at) WHERE status = 'parked';
CREATE INDEX webhook_deliveries_subscription ON webhook_deliveries (subscription_id, status);

CREATE TABLE webhook_attempts (
    id                 bigserial PRIMARY KEY,
    org_id             uuid NOT NULL,
    delivery_id        bigint NOT NULL REFERENCES webhook_deliveries (id) ON DELETE CASCADE,
    attempted_at       timestamptz NOT NULL,
    duration_ms        integer NOT NULL,
    status_code        integer,
    error              text,
    -- At most 64 KiB of the response body.
    response_body      text,
    response_truncated boolean NOT NULL DEFAULT false
);
CREATE INDEX webhook_attempts_delivery ON webhook_attempts (delivery_id);

-- Operator audit log --------------------------------------------------------------------

CREATE TABLE platform.audit_events (
    id            bigserial PRIMARY KEY,
    actor_user_id text,
    actor_email   text,
    action        text NOT NULL,
    target_type   text,
    target_id     text,
    target_org_id uuid,
    ip            text,
    user_agent    text,
    status_code   integer NOT NULL,
    reason        text,
    occurred_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX audit_events_occurred_at ON platform.audit_events (occurred_at);

CREATE FUNCTION platform.reject_audit_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'platform.audit_events is append-only: % rejected', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END;
$$;

CREATE TRIGGER audit_events_append_only
    BEFORE UPDATE OR DELETE ON platform.audit_events
    FOR EACH ROW EXECUTE FUNCTION platform.reject_audit_change();

CREATE TRIGGER audit_events_no_truncate
    BEFORE TRUNCATE ON platform.audit_events
    FOR EACH STATEMENT EXECUTE FUNCTION platform.reject_audit_change();

REVOKE UPDATE, DELETE, TRUNCATE ON platform.audit_events FROM PUBLIC;
