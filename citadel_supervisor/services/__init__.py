"""Built-in service types, each a plugin registered in the ``citadel`` entry-point group."""
