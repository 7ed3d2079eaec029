-- The enricher's count of flows with an implausible time (a broken exporter clock):
-- flows whose end was outside the window around their receive time, clamped or sent to the DLQ
-- (enricher/times.py). A delta like every other counter: read with sum(...). Rows written
-- before this migration read as 0. Safe to re-run (IF NOT EXISTS).
ALTER TABLE completeness ADD COLUMN IF NOT EXISTS implausible_time UInt64 DEFAULT 0 AFTER duplicates_dropped;
