"""Logging: citadeld's own log (``daemon_log``), each worker's output (``worker_output``), and the masking of secrets in both (``masking``)."""
