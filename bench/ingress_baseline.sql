-- pgbench baseline of the ingress: per transaction, the rows the ingress writes for one
-- inbound text webhook (the routing lookup, the raw body, one event, one outbox row),
-- with bodies of the same size. Run by scripts/bench at the same concurrency as the
-- ingress measurement. pgbench replaces `:org_id` (from `-D org_id=<uuid>`) as text,
-- inside quotes too, in its default simple query mode.
\set n random(1, 2000000000)
BEGIN;
SELECT org_id FROM phone_numbers WHERE phone_number_id = '200000000000001';
INSERT INTO inbound_webhooks (body_sha256, body, outcome, event_count)
    VALUES (sha256(convert_to(:n || ':' || clock_timestamp()::text || random()::text, 'UTF8')),
            convert_to(repeat('x', 760), 'UTF8'), 'accepted', 1);
INSERT INTO events (id, org_id, type, dedup_key, phone_number_id, data, created_at)
    VALUES (gen_random_uuid(), ':org_id', 'message.received', 'message:' || gen_random_uuid()::text,
            '200000000000001',
            jsonb_build_object('waba_id', '100000000000001', 'phone_number_id', '200000000000001',
                               'message', jsonb_build_object('id', gen_random_uuid()::text, 'type', 'text',
                                                             'text', jsonb_build_object('body', repeat('y', 120)))),
            now());
INSERT INTO outbox (org_id, topic, routing_key, message_id, payload)
    VALUES (':org_id', 'event', 'message.received', gen_random_uuid(), convert_to(repeat('z', 520), 'UTF8'));
COMMIT;
