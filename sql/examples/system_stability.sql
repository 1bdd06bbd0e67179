-- Example: a statement-level "is the system stable?" signal, relayed on channel system_stability.
-- Requires examples/activities.sql (its table). Idempotent: applying it again replaces the function and triggers.
--
-- A row-level trigger would NOTIFY once per row: an UPDATE touching 10,000 activities would queue 10,000
-- notifications. These triggers are FOR EACH STATEMENT and read the statement's transition tables, so one
-- statement sends at most one notification, and one that leaves the number of active activities unchanged
-- (progress ticks, message edits, a running activity re-queued) sends none.
--
-- The payload names the key and carries the state, far below PostgreSQL's 8000-byte payload limit:
--   {"scope": "system", "state": "processing", "active": 3}     or     {"scope": "system", "state": "stable", "active": 0}
-- Relay it with (clients follow key "system", or "*"):
--   [[channels]]
--   name = "system_stability"
--   key = "json:scope"
--   include_payload = true      # the last state in a window wins, so a client always sees the newest one

DO $$
BEGIN
    IF to_regclass('activities') IS NULL THEN
        RAISE EXCEPTION 'system_stability.sql needs the activities table: apply examples/activities.sql first';
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION activities_system_stability_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    active_before bigint := 0;
    active_after bigint := 0;
    active_now bigint;
BEGIN
    -- PL/pgSQL plans a statement when it first runs it, so each branch names only the transition tables that
    -- its trigger (INSERT: new_rows, DELETE: old_rows, UPDATE: both) declares.
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        SELECT count(*) INTO active_before FROM old_rows WHERE status IN ('queued', 'running');
    END IF;
    IF TG_OP IN ('UPDATE', 'INSERT') THEN
        SELECT count(*) INTO active_after FROM new_rows WHERE status IN ('queued', 'running');
    END IF;
    IF active_before = active_after THEN
        RETURN NULL;  -- nothing this signal watches changed: stay silent
    END IF;
    -- The state as this transaction sees it; the notification is delivered when it commits. Clients treat it as
    -- a hint and refetch when it matters (a partial index on status keeps this count cheap on a large table).
    SELECT count(*) INTO active_now FROM activities WHERE status IN ('queued', 'running');
    PERFORM pg_notify('system_stability', json_build_object(
        'scope', 'system',
        'state', CASE WHEN active_now = 0 THEN 'stable' ELSE 'processing' END,
        'active', active_now
    )::text);
    RETURN NULL;
END
$$;

-- PostgreSQL allows transition tables only on single-event triggers, hence three of them.
DROP TRIGGER IF EXISTS system_stability_insert ON activities;
CREATE TRIGGER system_stability_insert AFTER INSERT ON activities
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION activities_system_stability_notify();

DROP TRIGGER IF EXISTS system_stability_update ON activities;
CREATE TRIGGER system_stability_update AFTER UPDATE ON activities
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION activities_system_stability_notify();

DROP TRIGGER IF EXISTS system_stability_delete ON activities;
CREATE TRIGGER system_stability_delete AFTER DELETE ON activities
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION activities_system_stability_notify();
