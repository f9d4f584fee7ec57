"""What an operator sees: the status page (`/proxy/ui`) and its live event stream
(`/proxy/events`)."""
