-- Outbound messages sent through the customer API, and the sending state of phone
-- numbers. Forward-only, like every migration.

-- One row per message a customer asked to send. The state only moves forward:
-- queued (0) < accepted (1) < sent (2) < delivered (3) < read (4); failed (5) is
-- terminal. The dispatcher moves it to accepted when the Graph API returns a wamid;
-- Meta's status webhooks move it on from there, matched by wamid or by the message id
-- echoed in biz_opaque_callback_data.
CREATE TABLE outbound_messages (
    id                 uuid PRIMARY KEY,
    org_id             uuid NOT NULL REFERENCES orgs (id),
    phone_number_id    text NOT NULL REFERENCES phone_numbers (phone_number_id),
    recipient          text NOT NULL,
    type               text NOT NULL,
    -- The Graph API request body as the dispatcher sends it, minus
    -- biz_opaque_callback_data, which it adds.
    request            jsonb NOT NULL,
    idempotency_key    text,
    -- SHA-256 of the canonical request, to tell a retried request from a different one
    -- that reuses an idempotency key.
    request_sha256     bytea NOT NULL,
    state              text NOT NULL DEFAULT 'queued'
                       CHECK (state IN ('queued', 'accepted', 'sent', 'delivered', 'read', 'failed')),
    state_rank         smallint NOT NULL DEFAULT 0,
    wamid              text,
    error_code         integer,
    error_title        text,
    -- Why a failed message failed: permanent_error, retries_exhausted or status_failed.
    failure_reason     text,
    -- Failed because retries ran out; an operator can replay it.
    parked             boolean NOT NULL DEFAULT false,
    attempt_count      integer NOT NULL DEFAULT 0,
    -- Set before a Graph API call and cleared when its outcome is stored. A redelivered
    -- job that finds it set cannot know whether Meta took the send.
    attempt_started_at timestamptz,
    -- Incremented every time the message is queued again; a job carrying an older
    -- number is stale and dropped.
    dispatch_seq       integer NOT NULL DEFAULT 1,
    -- When a queued message waits for a retry, the time it is due.
    next_attempt_at    timestamptz,
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now(),
    accepted_at        timestamptz
) WITH (fillfactor = 80);
CREATE UNIQUE INDEX outbound_messages_idempotency ON outbound_messages (org_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE UNIQUE INDEX outbound_messages_wamid ON outbound_messages (org_id, wamid) WHERE wamid IS NOT NULL;
CREATE INDEX outbound_messages_due ON outbound_messages (next_attempt_at)
    WHERE state = 'queued' AND next_attempt_at IS NOT NULL;
CREATE INDEX outbound_messages_parked ON outbound_messages (org_id, updated_at) WHERE parked;
CREATE INDEX outbound_messages_org_created ON outbound_messages (org_id, created_at);

-- A number whose account-level error (expired token, blocked account, ...) stops its
-- sends. Its messages stay queued until the pause ends or an operator resumes it.
ALTER TABLE phone_numbers
    ADD COLUMN sending_paused_until timestamptz,
    ADD COLUMN sending_paused_code  integer,
    ADD COLUMN sending_paused_reason text;
