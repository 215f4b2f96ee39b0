"""The hub's database: one declarative Base; each area defines its tables beside its logic."""
