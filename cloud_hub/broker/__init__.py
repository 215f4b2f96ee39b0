"""Mosquitto configuration the hub generates: password file and per-device ACL."""
