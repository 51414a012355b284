-- On the west cluster: send kv.kv to the meridian instances of the east cluster.
CREATE CHANGEFEED FOR TABLE kv.kv
  INTO 'webhook-https://east_loadbalancer:30004/kv/public?insecure_tls_skip_verify=true'
  WITH diff, updated, resolved='1s', webhook_sink_config = '{"Flush":{"Bytes":1048576,"Frequency":"1s"}}';
