"""Password hashes in the brokers' formats (Mosquitto's ``$7$``, RabbitMQ's sha256).

The formats are a contract with devices that join by themselves and send only hashes, so they
live in :mod:`manifests.broker_passwords`; the hub keeps only these hashes, so it can
regenerate the password file without ever storing a password.
"""

from __future__ import annotations

from manifests.broker_passwords import ITERATIONS, SALT_BYTES, check_password, hash_password, rabbit_hash

__all__ = ["ITERATIONS", "SALT_BYTES", "check_password", "hash_password", "rabbit_hash"]
