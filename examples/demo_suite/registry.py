"""A module-level registry, the kind of global state real suites leak through."""

PLUGINS: list[str] = []
