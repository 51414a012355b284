-- On both clusters: the database cdc-sink/replicator used for staging and
-- replication state (kept for compatibility with the seed's instructions).
CREATE DATABASE IF NOT EXISTS _cdc_sink;

-- Changefeeds need rangefeeds.
SET CLUSTER SETTING kv.rangefeed.enabled = true;
