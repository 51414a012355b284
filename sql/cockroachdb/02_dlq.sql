-- In the database being replicated (here: kv), on both clusters.
CREATE TABLE IF NOT EXISTS cdc_sink_dlq (
event UUID DEFAULT gen_random_uuid() PRIMARY KEY,
dlq_name TEXT NOT NULL,
source_nanos INT8 NOT NULL,
source_logical INT8 NOT NULL,
data_after JSONB NOT NULL,
data_before JSONB NOT NULL
);
