"""`kcp-host cloud-refresh` on real hosts: a changed bundle reaches every member, one member at a time, under writes.

The `local` stack's members play GCE machines. Each gets what the cloud boot path would have left (a boot.env with
provider gce, and the slot.env of its bundle) and a STAND-IN `gcloud` on PATH that serves, as the secret store, the
agent's bundle and a NEW bundle for the member's slot: the same stack with etcd.electionMs changed, rendered with
`etcd_member_files` and the deployment's real certificates. Then the refresh runs on every member at the same time,
while a writer puts keys through the members and a sampler counts the healthy voters every 100 ms, both from the
backup host's network namespace. Pass: every member runs the new election timeout, never two voters down at once, no
acknowledged write lost, and a second run changes nothing.
"""

from __future__ import annotations

import copy
import json
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from components.facts import cluster_facts
from components.render import backup
from components.render.agent import agent_files
from components.render.hostfiles import Credentials, HostFile, bundle, etcd_member_files
from components.topology import plan
from components.validation import load
from kcp_host.contract import AGENT, BACKUP_SSH_KEY, BootEnv, SlotEnv, render_env
from tests.figures import record
from tests.integration.conftest import Deployment
from tests.integration.test_self_healing import Load, assert_acked_writes_present, assert_hashkv_equal, start_load

pytestmark = pytest.mark.integration

NEW_ELECTION_MS = 1400
STAND_IN = "/usr/local/libexec/kcp-test"  # the stand-in gcloud, and under secrets/ what it serves
# The stand-in for Google's CLI: `gcloud secrets versions access latest --secret=NAME ...` prints the secret.
GCLOUD = (f'#!/bin/sh\n# STAND-IN for gcloud (tests/integration/test_cloud_refresh.py): serves {STAND_IN}/secrets\n'
          f'for a; do case $a in --secret=*) exec cat "{STAND_IN}/secrets/${{a#--secret=}}" ;; esac; done\n'
          'echo "ERROR: (gcloud) stand-in: no --secret" >&2; exit 1\n')
REFRESH = f"PATH={STAND_IN}:$PATH {AGENT} cloud-refresh"
PROGRAMS = "local-host-programs"


def member_bundle(d: Deployment, config: dict[str, Any], host: str) -> str:
    """What the cloud's secret store would hold for `host`'s slot after a `pulumi up` of `config`: its etcd member
    files with the deployment's certificates, and the slot.env every cloud bundle carries."""
    cfg = load(config)
    topology = plan(cfg)
    assert cfg.baremetal is not None
    bh = cfg.baremetal.backup_host
    facts = cluster_facts(cfg, topology, {m.name: m.address or "" for m in (*topology.machines, *topology.spares)},
                          cfg.baremetal.api_vip, backup.ssh_destination(bh.user, bh.address, bh.path,
                                                                        cfg.cluster_name), BACKUP_SSH_KEY)
    names = (f"etcd-server-{host}", f"etcd-peer-{host}", "etcd-backup-client")
    creds = Credentials({"etcd-ca": d.output("local-pki-etcd-ca", "certPem")},
                        {n: (d.output(f"local-pki-{n}", "certPem"), d.output(f"local-pki-{n}-key", "privateKeyPem"))
                         for n in names}, "", "", "", "")
    me = next(m for m in facts.members if m.name == host)
    return bundle([*etcd_member_files(facts, me, creds), slot_env(cfg.etcd.version, host)])


def slot_env(version: str, host: str) -> HostFile:
    return HostFile(SlotEnv.PATH, render_env(SlotEnv(host, ("distro", version, "-")), "test: the slot's bundle"))


def install_stand_ins(d: Deployment, host: str, slot_bundle: str) -> None:
    """What the cloud boot path leaves on a machine, and the stand-in secret store with the new bundles."""
    boot = BootEnv(provider="gce", cluster=d.config["clusterName"], roles=("etcd",), programs_secrets=(PROGRAMS,),
                   disk="local", marker="gs://stand-in/local/cluster-formed", gce_project="stand-in")
    files = {BootEnv.PATH: render_env(boot, "test: a GCE machine's boot settings"),
             SlotEnv.PATH: slot_env(d.config["etcd"]["version"], host).content,
             f"{STAND_IN}/gcloud": GCLOUD, f"{STAND_IN}/secrets/{PROGRAMS}": bundle(agent_files()),
             f"{STAND_IN}/secrets/{host}": slot_bundle}
    for path, content in files.items():
        mode = "0755" if path.endswith("/gcloud") else "0644"
        d.sandbox.ssh(host, f"install -D -m {mode} /dev/stdin {path}", input=str(content).encode())


def etcd_environment(d: Deployment, host: str) -> tuple[str, str]:
    """etcd's PID and its ETCD_ELECTION_TIMEOUT, as the running process has it."""
    out = d.sandbox.ssh(host, "pid=$(systemctl show -p MainPID --value etcd); echo $pid; "
                              "tr '\\0' '\\n' </proc/$pid/environ | grep ^ETCD_ELECTION_TIMEOUT=").stdout.decode()
    pid, setting = out.split()
    return pid, setting.partition("=")[2]


def refresh_everywhere(d: Deployment) -> dict[str, tuple[subprocess.CompletedProcess[bytes], float]]:
    """`kcp-host cloud-refresh` on every member at the same moment; each one's result and when it ended."""
    def run(host: str) -> tuple[subprocess.CompletedProcess[bytes], float]:
        proc = d.sandbox.ssh(host, REFRESH, timeout=900, check=False)
        return proc, time.time()

    with ThreadPoolExecutor(len(d.members)) as pool:
        return dict(zip(d.members, pool.map(run, d.members), strict=True))


def start_sampler(d: Deployment, log: Path) -> subprocess.Popen[bytes]:
    ca, cert, key = d.client_tls
    return subprocess.Popen(
        ["ip", "netns", "exec", d.sandbox.netns(d.backup_host), sys.executable, str(Path(__file__).with_name(
            "voters.py")), "--endpoints", ",".join(d.client_endpoints), "--cacert", str(ca), "--cert", str(cert),
         "--key", str(key), "--out", str(log)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)


@dataclass
class Refreshed:
    """What `kcp-host cloud-refresh` on every member at once, under writes and the voter sampler, left."""

    journal: dict[str, str]  # each member's output
    started: float
    took: float  # seconds until the last member was done
    samples: list[dict[str, Any]]  # the sampler's, from the start on
    load: Load
    acks: list[dict[str, Any]]


def refresh_under_writes(d: Deployment, name: str) -> Refreshed:
    """Every member refreshes at the same moment; each must succeed. Prints each member's output in finishing order."""
    log = d.workdir / f"{name}-voters.jsonl"
    sampler, load = start_sampler(d, log), start_load(d, name)
    try:
        started = time.time()
        results = refresh_everywhere(d)
        time.sleep(2)  # writes resume through the last restarted member too
    finally:
        sampler.send_signal(signal.SIGTERM)
        sampler.wait(timeout=30)
        acks = load.stop()
    journal = {h: p.stderr.decode() + p.stdout.decode() for h, (p, _) in results.items()}
    for host, (_, ended) in sorted(results.items(), key=lambda r: r[1][1]):
        print(f"\n== {host}, done after {ended - started:.1f} s:\n{journal[host].strip()}")
    assert all(p.returncode == 0 for p, _ in results.values()), journal
    samples = [json.loads(line) for line in log.read_text().splitlines() if line.endswith("}")]
    return Refreshed(journal, started, max(end for _, end in results.values()) - started,
                     [s for s in samples if s["t"] >= started], load, acks)


def assert_a_second_refresh_does_nothing(d: Deployment) -> None:
    again = refresh_everywhere(d)
    assert all(p.returncode == 0 and b"nothing to do" in p.stdout for p, _ in again.values()), \
        {h: p.stdout.decode() + p.stderr.decode() for h, (p, _) in again.items()}


def test_a_new_bundle_reaches_every_member_one_at_a_time(local_cluster: Deployment) -> None:
    d = local_cluster
    new = copy.deepcopy(d.config)
    new["etcd"]["electionMs"] = NEW_ELECTION_MS
    for host in d.members:
        install_stand_ins(d, host, member_bundle(d, new, host))
    before = {h: etcd_environment(d, h) for h in d.members}
    assert {setting for _, setting in before.values()} == {str(d.config["etcd"]["electionMs"])}, before
    run = refresh_under_writes(d, "cloud-refresh")
    after = {h: etcd_environment(d, h) for h in d.members}
    assert all(after[h] == (after[h][0], str(NEW_ELECTION_MS)) and after[h][0] != before[h][0]
               for h in d.members), f"not every member restarted on the new configuration: {before} -> {after}"
    down = max((s["voters"] - s["healthy"] for s in run.samples), default=None)
    assert_acked_writes_present(d, d.members, run.load, run.acks)
    assert_hashkv_equal(d, d.members)
    figure = {"members": len(d.members), "seconds_to_all_members": round(run.took, 1), "most_down_at_once": down,
              "samples": len(run.samples), "writes_acked": len(run.acks), "writes_lost": 0}
    print(f"\nFIGURE (local test bed) cloud refresh, {json.dumps(figure)}")
    record("cloud refresh: a new bundle on every member, refreshes started together", run.took,
           "refresh interval (production)", 300, f"<= interval x members ({300 * len(d.members)} s)")
    assert len(run.samples) > run.took * 5, f"the sampler took {len(run.samples)} samples in {run.took:.0f}s"
    assert down is not None and down <= 1, f"{down} voters down at once"

    assert_a_second_refresh_does_nothing(d)
    assert {h: etcd_environment(d, h) for h in d.members} == after, "a second run restarted etcd"
