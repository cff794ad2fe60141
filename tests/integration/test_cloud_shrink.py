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

Then 3 -> 5 again: h4 and h5 boot as new machines in the same slots (empty data, no state; cloud-boot's own etcd
steps run with a STAND-IN for the bucket's marker) and find their old members marked removed; one staying member's
refresh of the five-member bundle clears the marks, and the boots, which kept starting etcd again, join as learners.
"""

from __future__ import annotations

import copy
import json
import shlex
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from components.render import boot
from kcp_host.cloudboot import RESTART_SECONDS
from kcp_host.contract import AGENT, MEMBERSHIP_TIMER_FILE, MEMBERSHIP_WATCH, MEMBERSHIP_WATCH_SECONDS
from testbed.sandbox import Sandbox
from tests.figures import record
from tests.integration.conftest import Deployment, deployed
from tests.integration.test_cloud_refresh import (
    REFRESH,
    STAND_IN,
    assert_a_second_refresh_does_nothing,
    install_stand_ins,
    member_bundle,
    refresh_everywhere,
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


# cloud-boot's own steps for an etcd slot after its metadata, disk and network ones (kcp_host/cloudboot.py main):
# unpack the slot's bundle (from stdin), then start_etcd, with a STAND-IN for the bucket's cluster-formed marker.
BOOT_ETCD = f"""import sys
sys.path.insert(0, "{AGENT}")
from kcp_host import cloudboot
class Bucket:  # STAND-IN for the cloud's marker object: the cluster has formed
    def marker_exists(self): return True
    def mark_formed(self): return False
cloudboot.unpack_slot(sys.stdin.read())
cloudboot.start_etcd(Bucket(), 600)
"""
NEW_MACHINE = (". /etc/etcd/cluster.env; systemctl disable --now etcd; "
               'rm -rf "$KCP_DATA_DIR" /var/lib/kcp/* /etc/etcd/join.env /etc/etcd/cluster-formed')


def boot_etcd(d: Deployment, host: str, slot_bundle: str) -> subprocess.Popen[bytes]:
    d.sandbox.ssh(host, "install -m 0600 /dev/stdin /run/kcp-test-slot-bundle", input=slot_bundle.encode())
    return subprocess.Popen([*d.sandbox.ssh_argv(host), f"python3 -c {shlex.quote(BOOT_ETCD)} "
                             "</run/kcp-test-slot-bundle"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)


def test_slots_added_again_join_once_a_refresh_clears_their_old_marks(five: Deployment) -> None:
    """3 -> 5 again, after the shrink above: the new machines in slots 3 and 4 find their old members marked removed
    (same names, same addresses) and etcd-member-recovery keeps etcd stopped, until a staying member's refresh of
    its new five-member bundle clears the marks; boot meanwhile starts etcd again, and they join as learners."""
    d = five
    assert set(voters(d)) == set(STAYING), "runs after the shrink"
    bundles = {host: member_bundle(d, d.config, host) for host in [*STAYING, *DROPPED]}  # the five-member stack
    for host in DROPPED:  # a new machine in the slot: an empty data disk and no state of the old member
        d.sandbox.start_host(host)
        d.sandbox.ssh(host, NEW_MACHINE, timeout=120)
        install_stand_ins(d, host, bundles[host])
    load = start_load(d, "cloud-grow")
    try:
        boots = {host: boot_etcd(d, host, bundles[host]) for host in DROPPED}
        time.sleep(RESTART_SECONDS + 10)  # boot found etcd kept stopped, and started it again
        kept = {host: d.sandbox.ssh(host, "cat /var/lib/kcp/not-a-member", check=False).stdout.decode()
                for host in DROPPED}
        assert all("marked removed" in text for text in kept.values()), kept
        assert set(voters(d)) == set(STAYING)
        install_stand_ins(d, "h1", bundles["h1"])  # one staying member's refresh, at its own tick
        refreshed = time.time()
        cleared = d.sandbox.ssh("h1", REFRESH, timeout=600, check=False)
        assert cleared.returncode == 0, cleared.stdout.decode() + cleared.stderr.decode()
        booted = {host: proc.communicate(timeout=600)[0].decode() for host, proc in boots.items()}
        for host, text in booted.items():
            print(f"\n== {host}, boot's etcd steps:\n{text.strip()}")
        assert all(proc.returncode == 0 for proc in boots.values()), booted
        assert all("starting it again" in text for text in booted.values()), booted
        deadline = time.time() + 120
        while voters(d) != dict.fromkeys([*STAYING, *DROPPED], True) and time.time() < deadline:
            time.sleep(1)
        five_at = time.time()
    finally:
        acks = load.stop()
    assert voters(d) == dict.fromkeys([*STAYING, *DROPPED], True), "not five voters"
    d.members = [*STAYING, *DROPPED]
    assert_acked_writes_present(d, d.members, load, acks)
    assert_hashkv_equal(d, d.members)
    figure = {"members": "3 -> 5 (slots added again)", "seconds_from_refresh_to_five_voters":
              round(five_at - refreshed, 1), "writes_acked": len(acks), "writes_lost": 0}
    print(f"\nFIGURE (local test bed) cloud grow after a shrink, {json.dumps(figure)}")
    for host in STAYING[1:]:
        install_stand_ins(d, host, bundles[host])
    rest = refresh_everywhere(d)
    assert all(p.returncode == 0 for p, _ in rest.values()), {h: p.stdout.decode() + p.stderr.decode()
                                                               for h, (p, _) in rest.items()}
    assert_a_second_refresh_does_nothing(d)
