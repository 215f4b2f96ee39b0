"""The agent's reconcile loop: a pure planner (desired vs observed -> actions), pure restart
and rollback decisions, and the executor that applies actions with real files, processes and
containers."""
