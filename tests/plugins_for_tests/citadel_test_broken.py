"""A plugin that fails when imported. Only for tests."""

raise RuntimeError("broken on purpose")
