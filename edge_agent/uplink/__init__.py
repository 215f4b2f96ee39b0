"""The device's links to its hub: HTTP (desired state, manifests, blobs) and the MQTT session."""
