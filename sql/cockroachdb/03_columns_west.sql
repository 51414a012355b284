-- On the west cluster: the hidden replication columns of each replicated table.
ALTER TABLE kv.kv
  ADD COLUMN _source string  NOT VISIBLE default 'west' on update 'west',
  ADD COLUMN _timestamp timestamptz NOT VISIBLE DEFAULT now() + '1s' on update now() + '1s';
