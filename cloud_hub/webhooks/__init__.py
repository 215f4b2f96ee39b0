"""Events to webhooks: subscriptions, an outbox of deliveries, and the dispatcher that sends
them as signed CloudEvents (docs/webhooks.md)."""
