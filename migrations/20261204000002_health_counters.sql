-- Counters behind /platform/health, so the endpoint never counts whole tables.
-- Statement-level triggers add each statement's net change per state to one of 16
-- shards picked at random, so concurrent writers rarely wait on the same counter row.
-- A reader sums the shards.

CREATE TABLE platform.counters (
    name  text NOT NULL,
    shard smallint NOT NULL,
    value bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (name, shard)
);

CREATE FUNCTION platform.count_outbox_change() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    picked smallint := floor(random() * 16)::smallint;
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO platform.counters (name, shard, value)
        SELECT 'outbox.' || state, picked, count(*) FROM new_rows GROUP BY state
        ON CONFLICT (name, shard) DO UPDATE SET value = platform.counters.value + EXCLUDED.value;
    ELSIF TG_OP = 'UPDATE' THEN
        INSERT INTO platform.counters (name, shard, value)
        SELECT 'outbox.' || state, picked, sum(delta)
        FROM (SELECT state, 1 AS delta FROM new_rows UNION ALL SELECT state, -1 FROM old_rows) AS changes
        GROUP BY state HAVING sum(delta) <> 0
        ON CONFLICT (name, shard) DO UPDATE SET value = platform.counters.value + EXCLUDED.value;
    ELSE
        INSERT INTO platform.counters (name, shard, value)
        SELECT 'outbox.' || state, picked, -count(*) FROM old_rows GROUP BY state
        ON CONFLICT (name, shard) DO UPDATE SET value = platform.counters.value + EXCLUDED.value;
    END IF;
    RETURN NULL;
END;
$$;

CREATE FUNCTION platform.count_delivery_change() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    picked smallint := floor(random() * 16)::smallint;
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO platform.counters (name, shard, value)
        SELECT 'webhook_deliveries.' || status, picked, count(*) FROM new_rows GROUP BY status
        ON CONFLICT (name, shard) DO UPDATE SET value = platform.counters.value + EXCLUDED.value;
    ELSIF TG_OP = 'UPDATE' THEN
        INSERT INTO platform.counters (name, shard, value)
        SELECT 'webhook_deliveries.' || status, picked, sum(delta)
        FROM (SELECT status, 1 AS delta FROM new_rows UNION ALL SELECT status, -1 FROM old_rows) AS changes
        GROUP BY status HAVING sum(delta) <> 0
        ON CONFLICT (name, shard) DO UPDATE SET value = platform.counters.value + EXCLUDED.value;
    ELSE
        INSERT INTO platform.counters (name, shard, value)
        SELECT 'webhook_deliveries.' || status, picked, -count(*) FROM old_rows GROUP BY status
        ON CONFLICT (name, shard) DO UPDATE SET value = platform.counters.value + EXCLUDED.value;
    END IF;
    RETURN NULL;
END;
$$;

-- A trigger with transition tables may name only one event, hence three of each.
CREATE TRIGGER outbox_count_insert AFTER INSERT ON outbox
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION platform.count_outbox_change();
CREATE TRIGGER outbox_count_update AFTER UPDATE ON outbox
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION platform.count_outbox_change();
CREATE TRIGGER outbox_count_delete AFTER DELETE ON outbox
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION platform.count_outbox_change();

CREATE TRIGGER deliveries_count_insert AFTER INSERT ON webhook_deliveries
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION platform.count_delivery_change();
CREATE TRIGGER deliveries_count_update AFTER UPDATE ON webhook_deliveries
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION platform.count_delivery_change();
CREATE TRIGGER deliveries_count_delete AFTER DELETE ON webhook_deliveries
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION platform.count_delivery_change();

-- Rows that existed before the triggers.
INSERT INTO platform.counters (name, shard, value)
SELECT 'outbox.' || state, 0, count(*) FROM outbox GROUP BY state;
INSERT INTO platform.counters (name, shard, value)
SELECT 'webhook_deliveries.' || status, 0, count(*) FROM webhook_deliveries GROUP BY status;

-- The oldest pending outbox row, found without scanning.
CREATE INDEX outbox_pending_id ON outbox (id) WHERE state = 'pending';
