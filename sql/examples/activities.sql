-- Example: a job system's progress table whose changes are relayed on channel activity_progress, keyed by id.
-- Requires sql/install.sql. Idempotent. The demo (notifyrelay demo) uses exactly this file.

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
