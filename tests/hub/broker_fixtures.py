"""Mosquitto fixtures (filled in by the owner of the MQTT side)."""
