"""CLI command groups, one module each; importing a module registers its commands."""
