"""What the agent tells the hub: the reported state (from its records) and telemetry samples."""
