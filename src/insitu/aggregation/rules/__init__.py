"""Aggregation rules found by file: every module here is imported by the registry on first use, so
a new file whose factory carries ``@register("name")`` is an aggregator of the CLI and TOML."""
