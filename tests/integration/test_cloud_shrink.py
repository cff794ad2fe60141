"""A cloud stack shrinks from 5 etcd members to 3: `kcp-host cloud-refresh` removes the dropped slots' members.

On GCE and AWS a `pulumi up` with `etcd.members: 3` deletes slots 3 and 4 (their groups and machines) and gives the
slots that stay a new bundle listing three members; nothing runs on the machines then. Here five `local` members
play GCE machines as in test_cloud_refresh.py (a boot.env, the slot's bundle, a STAND-IN `gcloud` serving the new
bundles): h4 and h5 are killed as their deletion kills them, then the refresh runs on h1-h3 at the same moment, under
writes and a sampler of healthy voters. Pass: the member list holds the three, all healthy (a quorum of 2 of 3 again,
not 3 of 5), never two of the three down at once, no acknowledged write lost, and a second run changes nothing.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from typing import Any

import pytest

from testbed.sandbox import Sandbox
from tests.figures import record
from tests.integration.conftest import Deployment, deployed
from tests.integration.test_cloud_refresh import (
    assert_a_second_refresh_does_nothing,
    install_stand_ins,
    member_bundle,
    refresh_under_writes,
)
from tests.integration.test_self_healing import assert_acked_writes_present, assert_hashkv_equal

pytestmark = pytest.mark.integration

DROPPED = {"h4": 15, "h5": 16}  # slots 3 and 4, by last address byte
STAYING = ["h1", "h2", "h3"]


def five_members(cfg: dict[str, Any], sandbox: Sandbox) -> None:
    for name, zone in zip(DROPPED, ("rack-a", "rack-b"), strict=True):
        cfg["baremetal"]["hosts"].append({"name": name, "address": sandbox.address(name), "zone": zone,
                                          "roles": ["etcd", "apiserver", "loadbalancer"],
                                          "hostKey": sandbox.host_key(name)})
    cfg["etcd"]["members"] = cfg["apiServers"]["count"] = 5


@pytest.fixture(scope="module")
def five() -> Iterator[Deployment]:
    with deployed("kcp-shrink-", five_members, extra_hosts=DROPPED) as deployment:
        yield deployment


def voters(d: Deployment) -> dict[str, bool]:
    """Each listed member's name: whether it votes."""
    listed = json.loads(d.etcdctl("h1", "member", "list", "-w", "json").stdout)["members"]
    return {m.get("name", ""): not m.get("isLearner", False) for m in listed}


def test_dropped_slots_leave_etcd_and_the_three_tolerate_a_failure_again(five: Deployment) -> None:
    d = five
    assert voters(d) == dict.fromkeys([*STAYING, *DROPPED], True)
    three = copy.deepcopy(d.config)
    three["baremetal"]["hosts"] = [h for h in three["baremetal"]["hosts"] if h["name"] not in DROPPED]
    three["etcd"]["members"] = three["apiServers"]["count"] = 3
    for host in DROPPED:  # `pulumi up` deletes the dropped slots' groups and so their machines
        d.sandbox.kill_host(host)
    d.members = STAYING
    for host in STAYING:
        install_stand_ins(d, host, member_bundle(d, three, host))
    run = refresh_under_writes(d, "cloud-shrink")
    assert voters(d) == dict.fromkeys(STAYING, True), "the dropped slots' members are still listed"
    assert sum("(removed " in text for text in run.journal.values()) == 1, \
        "one member removes, the others find it done"
    staying_down = max((len(set(s["down"]) - set(DROPPED)) for s in run.samples), default=None)
    three_at = next((s["t"] for s in run.samples if s["voters"] == len(STAYING)), None)
    assert_acked_writes_present(d, STAYING, run.load, run.acks)
    assert_hashkv_equal(d, STAYING)
    assert run.samples[-1]["voters"] == run.samples[-1]["healthy"] == len(STAYING), run.samples[-1]
    assert three_at is not None
    removed_after = three_at - run.started
    figure = {"members": "5 -> 3", "seconds_to_three_voters": round(removed_after, 1),
              "seconds_to_all_refreshed": round(run.took, 1), "most_staying_down_at_once": staying_down,
              "writes_acked": len(run.acks), "writes_lost": 0}
    print(f"\nFIGURE (local test bed) cloud shrink, {json.dumps(figure)}")
    record("cloud shrink 5 -> 3: dropped members removed after the refreshes started", removed_after,
           "refresh interval (production)", 300, "within one refresh")
    assert staying_down is not None and staying_down <= 1, f"{staying_down} of the staying voters down at once"
    assert_a_second_refresh_does_nothing(d)
