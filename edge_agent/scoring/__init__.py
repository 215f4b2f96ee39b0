"""The scoring server that runs inside a module: loads its entry script and serves HTTP.

- :mod:`edge_agent.scoring.entry`: importing the entry script, calling ``init()``/``run()``.
- :mod:`edge_agent.scoring.app`: the ASGI application (``/``, ``/healthz``, ``/score``,
  ``/swagger.json``, ``/metrics``).
- :mod:`edge_agent.scoring.server`: uvicorn in one or several worker processes.
- ``python -m edge_agent.scoring --module-dir DIR --port P``: the command the agent's process
  runtime and the container image run.
"""
