"""A cloud stack shrinks from 5 etcd members to 3: the staying members' membership watch removes the dropped ones.

On GCE and AWS a `pulumi up` with `etcd.members: 3` deletes slots 3 and 4 (their groups and machines) and gives the
slots that stay a new bundle listing three members; nothing runs on the machines then. Here five `local` members
play GCE machines as in test_cloud_refresh.py (a boot.env, the slot's bundle, a STAND-IN `gcloud` serving the new
bundles). h1-h3 run the slot bundle's membership watch as cloud-boot starts it (`kcp-cloud-membership.timer`, real
systemd; only the unit's PATH gains the stand-in). Under writes and a sampler of healthy voters, h4 and h5 are killed
as their deletion kills them, and nothing else is done: the watch must notice the silent voters, read the new
bundle and remove both within a minute. Then `kcp-host cloud-refresh` applies the rest of the bundle on h1-h3 at once.
Pass: the member list holds the three, all healthy (a quorum of 2 of 3 again, not 3 of 5), never two of the three
down at once, no acknowledged write lost, and a second refresh changes nothing.
"""

from __future__ import annotations

import copy
import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from components.render import boot
from kcp_host.contract import MEMBERSHIP_TIMER_FILE, MEMBERSHIP_WATCH, MEMBERSHIP_WATCH_SECONDS
from testbed.sandbox import Sandbox
from tests.figures import record
from tests.integration.conftest import Deployment, deployed
from tests.integration.test_cloud_refresh import (
    STAND_IN,
    assert_a_second_refresh_does_nothing,
    install_stand_ins,
    member_bundle,
    refresh_under_writes,
    start_sampler,
)
from tests.integration.test_self_healing import assert_acked_writes_present, assert_hashkv_equal, start_load

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


def start_membership_watch(d: Deployment, host: str) -> None:
    """The slot bundle's watch units, started as `cloudboot.start_membership_watch` starts them; a drop-in puts the
    STAND-IN gcloud on the unit's PATH (the only difference from a cloud machine)."""
    units = {**boot.membership_units(), f"/etc/systemd/system/{MEMBERSHIP_WATCH}.service.d/stand-in.conf":
             f"[Service]\nEnvironment=PATH={STAND_IN}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n"}
    for path, unit in units.items():
        d.sandbox.ssh(host, f"install -D -m 0644 /dev/stdin {path}", input=unit.encode())
    d.sandbox.ssh(host, f"systemctl daemon-reload && systemctl enable --now {Path(MEMBERSHIP_TIMER_FILE).name}")


def watch_ran(d: Deployment, host: str) -> bool:
    unit = f"{MEMBERSHIP_WATCH}.service"
    return bool(d.sandbox.ssh(host, f"systemctl show -p ExecMainExitTimestamp --value {unit}").stdout.strip())


def watch_journal(d: Deployment, host: str) -> str:
    return d.sandbox.ssh(host, f"journalctl -o cat --no-pager -u {MEMBERSHIP_WATCH}.service").stdout.decode()


def test_dropped_slots_leave_etcd_and_the_three_tolerate_a_failure_again(five: Deployment) -> None:
    d = five
    assert voters(d) == dict.fromkeys([*STAYING, *DROPPED], True)
    three = copy.deepcopy(d.config)
    three["baremetal"]["hosts"] = [h for h in three["baremetal"]["hosts"] if h["name"] not in DROPPED]
    three["etcd"]["members"] = three["apiServers"]["count"] = 3
    for host in STAYING:
        install_stand_ins(d, host, member_bundle(d, three, host))
        start_membership_watch(d, host)
    d.members = STAYING
    log = d.workdir / "cloud-shrink-voters.jsonl"
    sampler, load = start_sampler(d, log), start_load(d, "cloud-shrink")
    try:
        time.sleep(MEMBERSHIP_WATCH_SECONDS + 5)  # the watch has run with every voter answering: it did nothing
        quiet = {host: (watch_ran(d, host), watch_journal(d, host)) for host in STAYING}
        assert all(ran and "silent voters" not in text for ran, text in quiet.values()), quiet
        assert voters(d) == dict.fromkeys([*STAYING, *DROPPED], True)
        for host in DROPPED:  # `pulumi up` deletes the dropped slots' groups and so their machines
            d.sandbox.kill_host(host)
        killed = time.time()
        deadline = killed + 2 * MEMBERSHIP_WATCH_SECONDS + 60
        while set(voters(d)) != set(STAYING) and time.time() < deadline:
            time.sleep(0.5)
        time.sleep(2)
    finally:
        sampler.send_signal(signal.SIGTERM)
        sampler.wait(timeout=30)
        acks = load.stop()
    journals = {host: watch_journal(d, host) for host in STAYING}
    for host, text in journals.items():
        print(f"\n== {host}, {MEMBERSHIP_WATCH}.service:\n{text.strip()}")
    assert voters(d) == dict.fromkeys(STAYING, True), "the dropped slots' members are still listed"
    assert sum("(removed " in text for text in journals.values()) == 1, "one member removes, the others find it done"
    samples = [json.loads(line) for line in log.read_text().splitlines() if line.endswith("}")]
    after_kill = [s for s in samples if s["t"] >= killed]
    three_at = next((s["t"] for s in after_kill if s["voters"] == len(STAYING)), None)
    staying_down = max((len(set(s["down"]) - set(DROPPED)) for s in after_kill), default=None)
    assert_acked_writes_present(d, STAYING, load, acks)
    assert three_at is not None, "the sampler never saw three voters"
    removed_after = three_at - killed
    figure = {"members": "5 -> 3", "seconds_from_kill_to_three_voters": round(removed_after, 1),
              "watch_every_seconds": MEMBERSHIP_WATCH_SECONDS, "most_staying_down_at_once": staying_down,
              "writes_acked": len(acks), "writes_lost": 0}
    print(f"\nFIGURE (local test bed) cloud shrink, {json.dumps(figure)}")
    record("cloud shrink 5 -> 3: dropped members removed after their machines died (membership watch)",
           removed_after, "the watch's interval", MEMBERSHIP_WATCH_SECONDS, "<= 2 x interval")
    assert staying_down is not None and staying_down <= 1, f"{staying_down} of the staying voters down at once"
    assert removed_after <= 2 * MEMBERSHIP_WATCH_SECONDS, f"removed {removed_after:.1f} s after the kill"

    run = refresh_under_writes(d, "cloud-shrink-refresh")  # the rest of the new bundle, one member at a time
    assert not any("(removed " in text for text in run.journal.values()), "the watch had removed them already"
    assert max((s["voters"] - s["healthy"] for s in run.samples), default=None) in (0, 1), "two voters down at once"
    assert_acked_writes_present(d, STAYING, run.load, run.acks)
    assert_hashkv_equal(d, STAYING)
    assert run.samples[-1]["voters"] == run.samples[-1]["healthy"] == len(STAYING), run.samples[-1]
    assert_a_second_refresh_does_nothing(d)
