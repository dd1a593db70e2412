"""Observability: logging set-up, every Prometheus metric, and the test fault hook (layer 1)."""
