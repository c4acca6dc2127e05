"""The command-line entry points: ``citadeld`` and ``citadelctl``."""
