"""Alert rules evaluated on the hub: rules, their evaluation, and the loop that runs it."""
