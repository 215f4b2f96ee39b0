"""Fleet decisions return their effects as data; nothing is published or synced by them.

Run against a hub's real database with no broker at all: the effects say what the executor
would have to do.
"""

from __future__ import annotations

from cloud_hub.fleet.desired import DesiredSigner, change_fleet
from cloud_hub.fleet.devices import enroll_device, retag_device, revoke_device
from cloud_hub.fleet.effects import Effects
from tests.hub.conftest import HubFactory


def test_each_change_says_what_it_asks_of_the_broker(hub: HubFactory) -> None:
    core = hub().core
    signer = DesiredSigner(core.hub_key, 3600)

    enrolled = change_fleet(core.sessions, signer, lambda s: enroll_device(s, "edge-1", {"site": "a"}))
    assert enrolled.effects == Effects(issued={"edge-1": 1}, accounts_changed=True)

    unchanged = change_fleet(
        core.sessions, signer, lambda s: retag_device(s, "edge-1", set_tags={"rack": "7"})
    )
    assert unchanged.effects == Effects()  # nothing it runs changed, no account changed

    revoked = change_fleet(core.sessions, signer, lambda s: revoke_device(s, "edge-1"))
    assert revoked.effects == Effects(cleared=frozenset({"edge-1"}), accounts_changed=True)
    assert revoked.effects.to_publish == ["edge-1"]

    again = change_fleet(core.sessions, signer, lambda s: enroll_device(s, "edge-1", {}))
    assert again.effects == Effects(issued={"edge-1": 2}, accounts_changed=True)  # generations rise
