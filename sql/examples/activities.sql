-- Example: a job system's progress table whose changes are relayed on channel activity_progress, keyed by id.
-- Requires sql/install.sql. Idempotent. The demo (notifyrelay demo) uses exactly this file.
--
-- The triggers below send only the key. To have the relay send the row itself, with progress figures, make the
-- channel a state channel (docs/state.md): once per batch it fetches the batch's rows with one query.
--
--   [[channels]]
--   name = "activity_progress"
--   [channels.state]
--   table = "activities"
--   key_column = "id"
--   columns = ["status", "objects_processed", "objects_to_process", "message", "updated_at"]
--   list_query = "SELECT id::text AS key, status, objects_processed, objects_to_process, message, updated_at FROM activities WHERE status NOT IN ('complete', 'failed', 'cancelled')"
--   [channels.progress]
--   done = "objects_processed"
--   total = "objects_to_process"          # 0 (as below, until known): indeterminate, no percent and no ETA
--   status = "status"
--   terminal = ["complete", "failed", "cancelled"]
--   failed = ["failed"]
--
-- The state pool needs only to read the columns clients may see (a role of its own is recommended):
--   GRANT SELECT (id, status, objects_processed, objects_to_process, message, updated_at) ON activities TO relay_reader;
-- The triggers' WHEN clauses decide what counts as a change: a column left out of them (updated_at) is still sent in
-- rows, but changing only it sends nothing.

CREATE TABLE IF NOT EXISTS activities (
    id                  bigserial PRIMARY KEY,
    status              text        NOT NULL DEFAULT 'queued',
    objects_to_process  integer     NOT NULL DEFAULT 0,
    objects_processed   integer     NOT NULL DEFAULT 0,
    message             text,
    updated_at          timestamptz NOT NULL DEFAULT now()
);

-- A new activity is news for anyone following its id.
DROP TRIGGER IF EXISTS activity_progress_notify_insert ON activities;
CREATE TRIGGER activity_progress_notify_insert AFTER INSERT ON activities FOR EACH ROW
    EXECUTE FUNCTION notifyrelay.notify_key('activity_progress', 'id');

-- An update is news only when a column a progress UI shows actually changed: touching updated_at alone, or
-- rewriting a row with the same values, sends nothing.
DROP TRIGGER IF EXISTS activity_progress_notify ON activities;
CREATE TRIGGER activity_progress_notify AFTER UPDATE ON activities FOR EACH ROW
    WHEN (OLD.status IS DISTINCT FROM NEW.status
       OR OLD.objects_to_process IS DISTINCT FROM NEW.objects_to_process
       OR OLD.objects_processed IS DISTINCT FROM NEW.objects_processed
       OR OLD.message IS DISTINCT FROM NEW.message)
    EXECUTE FUNCTION notifyrelay.notify_key('activity_progress', 'id');
