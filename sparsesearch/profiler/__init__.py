"""On-device measurement: the timing harness (more to come: latency table, predictor, fingerprint)."""
