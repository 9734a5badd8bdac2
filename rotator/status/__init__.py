"""What a running proxy shows about itself on its status page and /metrics: the
snapshot and /status.json (`document`), the Prometheus metrics (`metrics`), the small
HTTP server they are served by (`http_server`), and the records they read that the
proxy keeps as it runs: its counts (`tally`) and its recent state changes (`timeline`).
The addon's part that serves them is rotator.proxy.status_page."""
