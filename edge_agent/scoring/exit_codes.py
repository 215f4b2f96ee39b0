"""How the scoring server's process ends, for whoever supervises it (the agent, a container
runtime, a shell). Kept apart from the server so that reading them imports no web stack."""

from __future__ import annotations

from manifests.errors import RuntimeFailure

#: stopped by SIGINT/SIGTERM
EXIT_OK = 0
#: bad command-line arguments
EXIT_USAGE = 2
#: the entry script could not be loaded or its init() raised (traceback in the log)
EXIT_START_FAILED = RuntimeFailure.exit_code
#: the public port is held by another program that does not share it
EXIT_PORT_IN_USE = 6
#: a worker ended by the run() watchdog (a run() overran its timeout); its supervisor starts another
EXIT_STUCK = 7
