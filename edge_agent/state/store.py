"""Loading and saving the agent's state files (atomically; see :mod:`edge_agent.state.files`)."""

from __future__ import annotations

import logging
from pathlib import Path

from pydantic import ValidationError

from edge_agent.state.records import AgentRecord
from manifests.durable import write_durable

log = logging.getLogger(__name__)

STATE_FILE = "agent-state.json"
DESIRED_FILE = "desired.json"


class StateStore:
    """``<state_dir>/agent-state.json`` and ``<state_dir>/desired.json``."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir
        self.state_path = state_dir / STATE_FILE
        self.desired_path = state_dir / DESIRED_FILE

    def load(self, device_id: str) -> AgentRecord:
        """The saved state, or a fresh one. A file that cannot be read is set aside (renamed
        ``.damaged``) rather than trusted: the hub's next desired state rebuilds what runs."""
        try:
            data = self.state_path.read_bytes()
        except FileNotFoundError:
            return AgentRecord(device_id=device_id)
        try:
            record = AgentRecord.model_validate_json(data)
        except ValidationError as exc:
            why = exc.errors()[0]["msg"]
            log.error("state file %s is damaged (%s); starting afresh", self.state_path, why)
            self.state_path.replace(self.state_path.with_suffix(".damaged"))
            return AgentRecord(device_id=device_id)
        if record.device_id != device_id:
            log.error(
                "state file %s belongs to device %r, not %r; starting afresh",
                self.state_path,
                record.device_id,
                device_id,
            )
            return AgentRecord(device_id=device_id)
        return record

    def save(self, record: AgentRecord) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        write_durable(self.state_path, record.model_dump_json(by_alias=True).encode())

    def load_desired(self) -> bytes | None:
        try:
            return self.desired_path.read_bytes()
        except FileNotFoundError:
            return None

    def save_desired(self, data: bytes) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        write_durable(self.desired_path, data)
