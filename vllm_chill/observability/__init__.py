"""What an operator sees: Prometheus metrics, log formatting, and masking secrets before they
reach either."""
