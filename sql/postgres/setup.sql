-- meridian schema kit for PostgreSQL. Run once in every replicated database,
-- in each region (safe to run again):
--
--   psql -v region=east -f sql/postgres/setup.sql 'postgresql://…/kv'
--
-- then, for every table that replicates:
--
--   SELECT meridian_enable('public.kv', meridian_region());      -- margin 1s
--   SELECT meridian_enable('public.kv', 'east', '500ms');        -- explicit
--
-- It installs:
--   * cdc_sink_dlq: the dead-letter table, with the seed's columns.
--   * meridian_region(): the region given with -v region=….
--   * meridian_stamp(): a BEFORE INSERT OR UPDATE trigger function that stamps
--     local writes with _source = region and _timestamp = now() + margin (as
--     the seed's CockroachDB DEFAULT / ON UPDATE expressions do), and leaves
--     rows written by meridian as they arrived. meridian marks its own apply
--     transactions with  SELECT set_config('meridian.applying', 'on', true);
--     the trigger skips stamping when current_setting('meridian.applying',
--     true) = 'on'. Any other session (and any other value) is a local write.
--   * meridian_enable(tbl regclass, region text, margin interval DEFAULT '1s'):
--     adds _source text and _timestamp timestamptz when absent (and sets
--     their defaults to the stamp, so plain inserts need no trigger call), sets REPLICA
--     IDENTITY FULL on the table and its partitions (the changefeed sends
--     the old row as "before"), adds the
--     table to the publication `meridian` (created when absent; it is the
--     default publication of `meridian changefeed`, whose --name defaults to
--     meridian), and (re)installs the trigger `meridian_stamp` on the table.
--
-- Ties: both regions can stamp the same _timestamp. Receivers compare
-- (_timestamp, _source) so that such a tie resolves the same way on both
-- sides (the greater region name wins); PostgreSQL has no invisible columns,
-- so _source and _timestamp are ordinary columns here.

\set ON_ERROR_STOP on
SET client_min_messages = warning;

\if :{?region}
\else
\echo 'setup.sql: set the region, e.g.  psql -v region=east -f sql/postgres/setup.sql'
\quit
\endif

-- The DLQ table, exactly as in the seed.
CREATE TABLE IF NOT EXISTS cdc_sink_dlq (
event UUID DEFAULT gen_random_uuid() PRIMARY KEY,
dlq_name TEXT NOT NULL,
source_nanos INT8 NOT NULL,
source_logical INT8 NOT NULL,
data_after JSONB NOT NULL,
data_before JSONB NOT NULL
);

SELECT format(
  'CREATE OR REPLACE FUNCTION meridian_region() RETURNS text LANGUAGE sql IMMUTABLE AS %L',
  format('SELECT %L::text', :'region')) AS ddl \gset
:ddl ;

CREATE OR REPLACE FUNCTION meridian_stamp() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  -- Rows meridian applies keep the _source/_timestamp they came with.
  IF current_setting('meridian.applying', true) = 'on' THEN
    RETURN NEW;
  END IF;
  NEW._source := TG_ARGV[0];
  NEW._timestamp := now() + TG_ARGV[1]::interval;
  RETURN NEW;
END
$$;

CREATE OR REPLACE FUNCTION meridian_enable(tbl regclass, region text, margin interval DEFAULT '1s')
RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
  part regclass;
BEGIN
  IF region IS NULL OR region = '' THEN
    RAISE EXCEPTION 'meridian_enable(%): region must not be empty', tbl;
  END IF;
  IF NOT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = tbl AND attname = '_source' AND NOT attisdropped) THEN
    EXECUTE format('ALTER TABLE %s ADD COLUMN _source text DEFAULT %L', tbl, region);
  END IF;
  IF NOT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = tbl AND attname = '_timestamp' AND NOT attisdropped) THEN
    EXECUTE format('ALTER TABLE %s ADD COLUMN _timestamp timestamptz DEFAULT now() + %L::interval',
                   tbl, margin);
  END IF;
  -- The stamp as column defaults too: a local insert that names neither
  -- column then already carries it, and the trigger's WHEN clause skips the
  -- PL/pgSQL call (which would store the same values) for it.
  EXECUTE format('ALTER TABLE %s ALTER COLUMN _source SET DEFAULT %L, '
                 'ALTER COLUMN _timestamp SET DEFAULT now() + %L::interval', tbl, region, margin);
  EXECUTE format('ALTER TABLE %s REPLICA IDENTITY FULL', tbl);
  -- A partitioned table's rows live in its partitions, and each has its own
  -- replica identity (partitions attached later need the same).
  FOR part IN SELECT relid FROM pg_partition_tree(tbl) WHERE isleaf AND relid <> tbl LOOP
    EXECUTE format('ALTER TABLE %s REPLICA IDENTITY FULL', part);
  END LOOP;

  -- Through partition roots: otherwise a partitioned table's changes come
  -- under the name of the partition they live in.
  IF NOT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = 'meridian') THEN
    CREATE PUBLICATION meridian WITH (publish_via_partition_root = true);
  END IF;
  IF NOT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = 'meridian' AND puballtables)
     AND NOT EXISTS (SELECT 1 FROM pg_publication_rel pr
                     JOIN pg_publication p ON p.oid = pr.prpubid
                     WHERE p.pubname = 'meridian' AND pr.prrelid = tbl) THEN
    EXECUTE format('ALTER PUBLICATION meridian ADD TABLE %s', tbl);
  END IF;

  IF EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = tbl AND tgname = 'meridian_stamp') THEN
    EXECUTE format('DROP TRIGGER meridian_stamp ON %s', tbl);
  END IF;
  -- The WHEN clause calls PL/pgSQL only where stamping changes something:
  -- not for meridian's own writes (the function checks again, for callers
  -- that fire it some other way), and not for a row that already holds
  -- this transaction's stamp (an insert that took the defaults). A
  -- PL/pgSQL call per row costs about as much as the insert itself.
  EXECUTE format('CREATE TRIGGER meridian_stamp BEFORE INSERT OR UPDATE ON %s '
                 'FOR EACH ROW WHEN (current_setting(''meridian.applying'', true) IS DISTINCT FROM ''on'' '
                 'AND (NEW._source IS DISTINCT FROM %L OR NEW._timestamp IS DISTINCT FROM now() + %L::interval)) '
                 'EXECUTE FUNCTION meridian_stamp(%L, %L)', tbl, region, margin, region, margin::text);
END
$$;
