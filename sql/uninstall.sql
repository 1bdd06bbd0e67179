-- notifyrelay: remove what install.sql created (idempotent). Triggers that use notifyrelay.notify_key() are
-- dropped with it (CASCADE): drop or replace them first if you want to keep their tables' other triggers in view.
DROP SCHEMA IF EXISTS notifyrelay CASCADE;
