"""Models on demand: starting and waking workers when requests want them, putting idle ones
to sleep or stopping them, and swap groups whose members take turns (docs/on-demand.md)."""
