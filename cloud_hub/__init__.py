"""The hub service: registry, devices, deployments over MQTT, state roll-up, dashboard."""
