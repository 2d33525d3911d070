"""One file per method: its config, its algorithm and its thin module.

Every module in this package is imported by the registry on first use, so a
new method needs nothing beyond its own file."""
