"""Tables of this area (filled in by its owner)."""
