"""Putting several hub replicas behind one address (a generated nginx config)."""
