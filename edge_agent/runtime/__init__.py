"""Where modules run: as processes of the device (``process``) or in containers (``docker``).
Both run the same scoring server with the same instance options, so an update hands the port
over the same way (``docs/architecture.md``)."""
