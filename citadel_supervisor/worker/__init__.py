"""One worker: its lifecycle (start, probe, stop, restart) and its restart policy."""
