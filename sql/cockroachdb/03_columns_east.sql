-- On the east cluster: the hidden replication columns of each replicated table.
-- _timestamp is pushed one second into the future to cover clock uncertainty.
ALTER TABLE kv.kv
  ADD COLUMN _source string  NOT VISIBLE default 'east' on update 'east',
  ADD COLUMN _timestamp timestamptz NOT VISIBLE DEFAULT now() + '1s' on update now() + '1s';
