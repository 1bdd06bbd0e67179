-- notifyrelay: install the trigger function (idempotent: running it again is harmless). SQL version 1.
-- Versioned: notifyrelay.version() returns the installed version; a later install.sql upgrades in place, and this
-- one refuses to replace a newer version.
-- Usage: psql "$DSN" -v ON_ERROR_STOP=1 -f sql/install.sql   (or: notifyrelay sql install --dsn "$DSN")

CREATE SCHEMA IF NOT EXISTS notifyrelay;

-- Refuse to downgrade: a newer install.sql may have created things this one does not know about.
DO $$
DECLARE
    installed integer;
BEGIN
    IF to_regprocedure('notifyrelay.version()') IS NOT NULL THEN
        EXECUTE 'SELECT notifyrelay.version()' INTO installed;
        IF installed > 1 THEN
            RAISE EXCEPTION 'notifyrelay SQL version % is installed; this install.sql is version 1 (older)', installed
                USING HINT = 'Use the install.sql of the notifyrelay release that installed it, or uninstall first.';
        END IF;
    END IF;
END
$$;

COMMENT ON SCHEMA notifyrelay IS 'notifyrelay: NOTIFY helpers for the notifyrelay daemon (sql version 1)';

-- The installed SQL's version, so that a later install.sql can tell what it upgrades.
CREATE OR REPLACE FUNCTION notifyrelay.version() RETURNS integer
LANGUAGE sql IMMUTABLE AS $$ SELECT 1 $$;

-- notifyrelay.notify_key(channel, key_column): a row trigger that NOTIFYs the row's key column, as text, on the
-- channel. Send keys, not rows: PostgreSQL refuses payloads of 8000 bytes or more, so keys stay small.
-- Pair it with a WHEN clause so that it fires only when watched columns actually change (see sql/examples/).
CREATE OR REPLACE FUNCTION notifyrelay.notify_key() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    key text;
BEGIN
    IF TG_NARGS <> 2 THEN
        RAISE EXCEPTION 'notifyrelay.notify_key(channel, key_column) takes 2 arguments, got % on trigger % of %',
            TG_NARGS, TG_NAME, TG_TABLE_NAME;
    END IF;
    IF TG_LEVEL <> 'ROW' THEN
        RAISE EXCEPTION 'notifyrelay.notify_key() is a FOR EACH ROW trigger (trigger % of %)', TG_NAME, TG_TABLE_NAME;
    END IF;
    IF TG_WHEN <> 'AFTER' THEN
        -- As a BEFORE trigger its NULL result would silently cancel the row's write.
        RAISE EXCEPTION 'notifyrelay.notify_key() must be an AFTER trigger (trigger % of %)', TG_NAME, TG_TABLE_NAME;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_attribute
                   WHERE attrelid = TG_RELID AND attname = TG_ARGV[1] AND attnum > 0 AND NOT attisdropped) THEN
        RAISE EXCEPTION 'notifyrelay.notify_key(): table % has no column %', TG_TABLE_NAME, TG_ARGV[1];
    END IF;
    -- The key "as text": the column cast with ::text, as a client's own SELECT key::text would render it.
    EXECUTE format('SELECT ($1).%I::text', TG_ARGV[1])
        USING (CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END)
        INTO key;
    IF key IS NULL THEN
        RETURN NULL;  -- nothing to name
    END IF;
    IF octet_length(key) > 1024 THEN
        RAISE EXCEPTION 'notifyrelay.notify_key(): key column % holds % bytes; keys must stay small (at most 1024)',
            TG_ARGV[1], octet_length(key);
    END IF;
    PERFORM pg_notify(TG_ARGV[0], key);
    RETURN NULL;
END
$$;
