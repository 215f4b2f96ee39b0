"""What the agent keeps on disk so that a restart (or a reboot with the hub and the broker
unreachable) neither accepts a replayed desired state nor forgets what it was running."""
