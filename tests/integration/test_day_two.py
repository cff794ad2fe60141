"""Day two on real hosts: every kind of change to a running control plane, applied the way a second
`pulumi up` applies it, under writes.

Each scenario changes the stack's config, captures the program again (outputs kept where the engine
keeps them), plans the update from the two graphs by the engine's rules (tests/integration/update_plan.py,
each rule citing its source), prints it as `pulumi preview` would, and runs it on the local test hosts
(tests/integration/replay.py). Meanwhile one writer puts keys through the etcd load balancer (the API
VIP), another against the member list (as kube-apiserver connects), and a sampler records the healthy
voters every 100 ms. Pass: no acknowledged write lost; healthy voters never below quorum; at most one
voter down at a time; the write gap against the member list at most 2 x the election timeout; the run
converges, and planning it again finds nothing to do. Scenarios run in file order on one cluster.
"""

from __future__ import annotations

import base64
import copy
import itertools
import json
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from components.render import agent
from components.topology import quorum
from kcp_host.contract import AGENT_SERVICES, DELTA_UNIT, METRICS_HTTP_UNIT
from testbed.sandbox import Sandbox
from tests.integration.conftest import LOCAL_STACK, fresh_sandbox, local_stack_for, sandbox_identity
from tests.integration.realtls import RealTlsMocks, plain
from tests.integration.replay import Replay, UpdateRun
from tests.integration.update_plan import UpdatePlan, plan_update, rerun_program
from tests.program import Program, run_program, stack_config

pytestmark = pytest.mark.integration

HERE = Path(__file__).parent
AGENT = "/usr/local/lib/kcp/kcp-host"
EXTRA = {"h4": 15, "h5": 16, "h6": 17}  # hosts the scenarios add, by last address byte


@dataclass
class Cluster:
    sandbox: Sandbox
    replay: Replay
    program: Program
    config: dict[str, Any]
    workdir: Path
    build: pytest.MonkeyPatch  # a new build of the project, from scenario a on
    figures: list[dict[str, Any]] = field(default_factory=list)

    @property
    def members(self) -> list[str]:
        return [h["name"] for h in self.config["baremetal"]["hosts"] if "etcd" in h["roles"]]

    def url(self, host: str) -> str:
        return f"https://{self.sandbox.address(host)}:2379"

    def etcdctl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
        """This machine's etcdctl with the API servers' client certificate, from the backup host's netns."""
        ca, cert, key = self.tls
        return self.sandbox.run_in_netns("backup", [
            "env", "ETCDCTL_API=3", "etcdctl", f"--endpoints={','.join(self.url(m) for m in self.members)}",
            f"--cacert={ca}", f"--cert={cert}", f"--key={key}", "--command-timeout=30s", *args], timeout=timeout)

    @property
    def tls(self) -> tuple[Path, Path, Path]:
        paths = tuple(self.workdir / n for n in ("ca.crt", "client.crt", "client.key"))
        if not paths[0].exists():
            out = self.program.outputs
            paths[0].write_text(plain(out["local-pki-etcd-ca"]["certPem"]))
            paths[1].write_text(plain(out["local-pki-apiserver-etcd-client"]["certPem"]))
            paths[2].write_text(plain(out["local-pki-apiserver-etcd-client-key"]["privateKeyPem"]))
            paths[2].chmod(0o600)
        return paths  # type: ignore[return-value]

    def main_pids(self, hosts: list[str], unit: str = "etcd") -> dict[str, str]:
        return {h: self.sandbox.ssh(h, f"systemctl show -p MainPID --value {unit}").stdout.decode().strip()
                for h in hosts}


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    from tests.integration.conftest import _require_testbed

    _require_testbed()
    _, subnet = sandbox_identity()
    base = stack_config(LOCAL_STACK)
    hosts = {h["name"]: h["address"].replace("10.250.0.", f"{subnet}.")
             for h in [*base["baremetal"]["hosts"], *base["baremetal"]["spares"]]}
    hosts |= {h: f"{subnet}.{byte}" for h, byte in EXTRA.items()}
    hosts["backup"] = base["baremetal"]["backupHost"]["address"].replace("10.250.0.", f"{subnet}.")
    build = pytest.MonkeyPatch()
    with fresh_sandbox(hosts) as sandbox, tempfile.TemporaryDirectory() as tmp:
        config = local_stack_for(subnet, sandbox.ssh_key_path)
        # The spare sits in the third rack, so that adopting it keeps one member per failure domain.
        config["baremetal"]["spares"][0]["zone"] = "rack-c"
        program = run_program(config, stack="local", mocks=RealTlsMocks)
        replay = Replay.of(sandbox, program)
        replay.first_up(program)
        yield Cluster(sandbox, replay, program, config, Path(tmp), build)
    build.undo()


# ----- observing a change ------------------------------------------------------------------------------

@dataclass
class Observed:
    started: float
    acks: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    samples: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    def gap(self, writer: str) -> float:
        """Longest time without an acknowledged write, from the start of the change."""
        times = [self.started, *sorted(a["t"] for a in self.acks[writer]), self.started + self.seconds]
        return max(b - a for a, b in itertools.pairwise(times))


def _process(c: Cluster, script: str, log: Path, *args: str) -> subprocess.Popen[bytes]:
    ca, cert, key = c.tls
    argv = ["ip", "netns", "exec", c.sandbox.netns("backup"), sys.executable, str(HERE / script),
            "--cacert", str(ca), "--cert", str(cert), "--key", str(key), "--out", str(log), *args]
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")] if path.exists() else []


@contextmanager
def under_writes(c: Cluster, name: str) -> Iterator[Observed]:
    vip = f"https://{c.config['baremetal']['apiVip']}:2379"
    members = ",".join(c.url(m) for m in c.members)
    every = ",".join(c.url(h) for h in c.sandbox.hosts if h != "backup")
    logs = {w: c.workdir / f"{name}-{w}.jsonl" for w in ("lb", "members", "voters")}
    procs = {
        "lb": _process(c, "writeload.py", logs["lb"], "--endpoints", vip, "--prefix", f"day2/{name}/lb/",
                       "--count", "100000", "--seconds", "900", "--interval", "0.02", "--timeout", "0.5"),
        "members": _process(c, "writeload.py", logs["members"], "--endpoints", members, "--prefix",
                            f"day2/{name}/members/", "--count", "100000", "--seconds", "900", "--interval", "0.02",
                            "--timeout", "0.5"),
        "voters": _process(c, "voters.py", logs["voters"], "--endpoints", every),
    }
    deadline = time.monotonic() + 30
    while len(_lines(logs["members"])) < 10 or not _lines(logs["voters"]):
        assert time.monotonic() < deadline, f"{name}: the writers or the sampler did not start"
        time.sleep(0.2)
    seen = Observed(time.time())
    try:
        yield seen
    finally:
        seen.seconds = time.time() - seen.started
        for proc in procs.values():
            proc.send_signal(signal.SIGTERM)
        for proc in procs.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
    seen.acks = {w: _lines(logs[w]) for w in ("lb", "members")}
    seen.samples = [s for s in _lines(logs["voters"]) if s["t"] >= seen.started]


def lost_writes(c: Cluster, seen: Observed, name: str) -> int:
    lost = 0
    for writer, acks in seen.acks.items():
        out = c.etcdctl("get", "--prefix", f"day2/{name}/{writer}/", "-w", "json", timeout=120)
        assert out.returncode == 0, out.stderr.decode()
        stored = {base64.b64decode(kv["key"]).decode(): base64.b64decode(kv["value"]).decode()
                  for kv in json.loads(out.stdout).get("kvs", [])}
        lost += sum(stored.get(a["key"]) != a["value"] for a in acks)
    return lost


# ----- one change ----------------------------------------------------------------------------------------

def plan(c: Cluster, edit: Callable[[dict[str, Any]], None]) -> tuple[dict[str, Any], Program, UpdatePlan]:
    config = copy.deepcopy(c.config)
    edit(config)
    after = rerun_program(config, c.program, stack="local", mocks=RealTlsMocks)
    return config, after, plan_update(c.program, after)


def apply(c: Cluster, name: str, edit: Callable[[dict[str, Any]], None],
          after_seconds: float = 0) -> tuple[UpdatePlan, UpdateRun, Observed]:
    """Plan, print and run one change under writes, which go on `after_seconds` once it ended; check the day-two
    bar; keep the new state."""
    config, after, update = plan(c, edit)
    print(f"\n== {name}: `pulumi preview`\n{update.preview()}")
    with under_writes(c, name) as seen:
        run = c.replay.run(update)
        time.sleep(after_seconds)
    assert run.ok, f"{name}: the update failed\n{run.report()}"
    c.program, c.config = after, config
    again = plan_update(after, rerun_program(config, after, stack="local", mocks=RealTlsMocks))
    assert not [ch.name for ch in again.changes if ch.op != "same"], \
        f"{name}: a second up still plans\n{again.preview()}"
    lost = lost_writes(c, seen, name)
    low = min((s["healthy"] - quorum(s["voters"]) for s in seen.samples if s["voters"]), default=0)
    down = max((s["voters"] - s["healthy"] for s in seen.samples), default=0)
    gap, limit = seen.gap("members"), 2 * c.config["etcd"]["electionMs"] / 1000
    figure = {"scenario": name, "seconds": round(seen.seconds, 1), "acked_lb": len(seen.acks["lb"]),
              "acked_members": len(seen.acks["members"]), "lost": lost, "min_healthy_voters": min(
                  (s["healthy"] for s in seen.samples), default=None), "min_quorum_margin": low,
              "most_down_at_once": down, "largest_gap_members_s": round(gap, 2), "gap_limit_s": limit,
              "largest_gap_lb_s": round(seen.gap("lb"), 2),
              "steps_run": len([r for r in run.results if not r.skipped])}
    c.figures.append(figure)
    slowest = sorted((r for r in run.results if not r.skipped), key=lambda r: -r.seconds)[:4]
    print(f"FIGURE (local test bed) day two, {json.dumps(figure)}; slowest steps: "
          + ", ".join(f"{r.name} {r.kind} {r.seconds:.1f}s" for r in slowest))
    assert lost == 0, f"{name}: {lost} acknowledged writes lost"
    assert low >= 0, f"{name}: healthy voters fell below quorum"
    assert down <= 1, f"{name}: {down} voters were down at once"
    assert gap <= limit, f"{name}: write gap against the member list {gap:.2f}s > {limit:.1f}s"
    return update, run, seen


def forget(program: Program, host: str) -> Program:
    """What `pulumi state delete` (scripts/forget-host) does for a dead host's resources: the engine no
    longer knows them, so nothing tries to reach the host."""
    gone = {r.urn for r in program.resources if r.name.startswith(f"local-{host}-")}
    kept = [copy.copy(r) for r in program.resources if r.urn not in gone]
    for r in kept:
        r.dependencies = [u for u in r.dependencies if u not in gone]
        r.property_dependencies = {k: [u for u in v if u not in gone] for k, v in r.property_dependencies.items()}
    return Program(resources=kept, outputs=program.outputs, generation=program.generation)


def updated(update: UpdatePlan, op: str = "update") -> set[str]:
    return set(update.named(op))


# ----- the scenarios, in order ------------------------------------------------------------------------------

def test_i_an_up_with_no_change_runs_nothing(cluster: Cluster) -> None:
    _, _, update = plan(cluster, lambda cfg: None)
    assert [c.name for c in update.changes if c.op != "same"] == [], update.preview()
    assert not [a for r in update.registrations for a in r.actions] and not update.deletes


def test_d_a_new_backup_interval_restarts_no_member(cluster: Cluster) -> None:
    pids = cluster.main_pids(cluster.members)
    update, _, _ = apply(cluster, "backup-interval", lambda cfg: cfg["backup"].update(intervalMinutes=30))
    assert updated(update) == {f"local-{h}-etcd-config" for h in (*cluster.members, "spare1")}, update.preview()
    assert cluster.main_pids(cluster.members) == pids, "a backup setting restarted etcd"
    timer = cluster.sandbox.ssh("h1", "systemctl cat etcd-backup.timer").stdout.decode()
    assert "OnCalendar=*-*-* *:00/30:00" in timer


def test_c_a_new_election_timeout_restarts_members_one_at_a_time(cluster: Cluster) -> None:
    pids = cluster.main_pids(cluster.members)
    apply(cluster, "election-timeout", lambda cfg: cfg["etcd"].update(electionMs=1200))
    after = cluster.main_pids(cluster.members)
    assert all(after[h] != pids[h] for h in cluster.members), f"not every member restarted: {pids} -> {after}"
    env = cluster.sandbox.ssh("h2", "cat /proc/$(systemctl show -p MainPID --value etcd)/environ | tr '\\0' '\\n'")
    assert b"ETCD_ELECTION_TIMEOUT=1200" in env.stdout


def test_a_a_new_build_updates_every_host_in_place(cluster: Cluster) -> None:
    pids = cluster.main_pids(cluster.members)
    runs_on = {DELTA_UNIT: cluster.members, METRICS_HTTP_UNIT: [*cluster.members, "spare1"]}
    services = {unit: cluster.main_pids(runs_on[unit], unit) for unit in AGENT_SERVICES}
    assert not [pid for by_host in services.values() for pid in by_host.values() if pid == "0"], services
    before = cluster.sandbox.ssh("h1", f"sha256sum {AGENT}").stdout.split()[0]
    sources = agent.agent_sources()
    new_build = {**sources, "kcp_host/__init__.py": sources["kcp_host/__init__.py"] + "# build 2\n"}
    cluster.build.setattr(agent, "agent_sources", lambda: new_build)  # the later scenarios keep the new build
    update, _, _ = apply(cluster, "new-build", lambda cfg: None)
    hosts = [h for h in cluster.sandbox.hosts if h not in ("h4", "h5", "h6")]
    assert updated(update) == {f"local-{h}-agent" for h in hosts}, update.preview()
    assert not update.named("replace") and not update.named("delete"), "a new build must not replace or delete"
    for host in hosts:
        now = cluster.sandbox.ssh(host, f"sha256sum {AGENT} && {AGENT} --help >/dev/null").stdout.split()[0]
        assert now != before, f"{host} still runs the old build"
    assert cluster.main_pids(cluster.members) == pids, "a new build restarted etcd"
    for unit, running in services.items():  # each kept the old build until it restarted
        now = cluster.main_pids(runs_on[unit], unit)
        assert all(now[h] not in ("0", running[h]) for h in running), f"{unit} not restarted: {running} -> {now}"
    backup = cluster.sandbox.ssh("h1", f"{AGENT} etcd-backup --any-member", check=False, timeout=300)
    assert backup.returncode == 0, f"backups stopped working after the new build: {backup.stderr.decode()[-500:]}"


def _served_serial(c: Cluster, host: str) -> str:
    ca, cert, key = c.tls
    probe = c.sandbox.run_in_netns("backup", ["sh", "-c", f"openssl s_client -connect {c.sandbox.address(host)}:2379 "
                                              f"-CAfile {ca} -cert {cert} -key {key} </dev/null 2>/dev/null | "
                                              "openssl x509 -noout -serial"], timeout=30)
    return probe.stdout.decode().strip()


def _declared_serial(c: Cluster, host: str) -> str:
    pem = plain(c.program.outputs[f"local-pki-etcd-server-{host}"]["certPem"])
    out = subprocess.run(["openssl", "x509", "-noout", "-serial"], input=pem.encode(), capture_output=True, check=True)
    return out.stdout.decode().strip()


STANDIN = "/usr/local/lib/kcp-standin/kubelet_standin.py"
# Drop-ins, since the API server's bundle carries the real units; KillMode=process: the kubelet's pods outlive it, as
# a real kubelet's containers do (containerd's real unit has it too).
STANDIN_DROP_INS = {
    "kubelet": "[Service]\nExecStart=\nExecStart=/usr/bin/python3 {standin} kubelet {address}\nKillMode=process\n",
    "containerd": "[Service]\nExecStartPre=\nExecStart=\nExecStart=/bin/sleep infinity\n",
}


def start_kubelet_standins(c: Cluster, hosts: list[str]) -> None:
    """No kubelet runs on the test hosts: a stand-in kubelet (and crictl, containerd) runs a stand-in API server
    pod on each, so that `static-pods-restart` restarts something real and every pod start and stop is recorded."""
    for host in hosts:
        c.sandbox.copy_to(host, HERE / "kubelet_standin.py", STANDIN)
        units = "".join(f"mkdir -p /etc/systemd/system/{name}.service.d; "
                        f"cat > /etc/systemd/system/{name}.service.d/stand-in.conf <<'EOF'\n"
                        f"{text.format(standin=STANDIN, address=c.sandbox.address(host))}EOF\n"
                        for name, text in STANDIN_DROP_INS.items())
        c.sandbox.ssh(host, f"set -e; {units}printf '#!/bin/sh\\nexec python3 {STANDIN} crictl \"$@\"\\n' "
                            "> /usr/local/bin/crictl; chmod 755 /usr/local/bin/crictl; systemctl daemon-reload; "
                            "systemctl start containerd kubelet")
    deadline = time.monotonic() + 30
    while any("ready" not in [e[0] for e in api_server_events(c, h)] for h in hosts):
        assert time.monotonic() < deadline, {h: api_server_events(c, h) for h in hosts}
        time.sleep(0.2)


def api_server_events(c: Cluster, host: str) -> list[tuple[str, int, float]]:
    """(start|ready|stop, pid, time) of the stand-in API server pods on `host`."""
    out = c.sandbox.ssh(host, "cat /run/kcp-standin/events 2>/dev/null || true").stdout.decode()
    return [(w[0], int(w[1]), float(w[2])) for w in (line.split() for line in out.splitlines())]


def down_intervals(events: list[tuple[str, int, float]], since: float) -> list[tuple[float, float]]:
    """When no pod of the host answered ready: from a ready pod's stop to the next pod's ready."""
    out, down_at = [], None
    for what, _, at in sorted(events, key=lambda e: e[2]):
        if what == "stop" and at >= since and down_at is None:
            down_at = at
        elif what == "ready" and down_at is not None:
            out.append((down_at, at))
            down_at = None
    return out + ([(down_at, float("inf"))] if down_at is not None else [])


def test_b_a_pki_rotation_makes_every_member_serve_its_new_certificate(cluster: Cluster) -> None:
    """New certificates for every host in one `pulumi up`: etcd members restart one at a time, and so do the API
    servers (stand-in kubelets and API servers, see kubelet_standin.py): never two of them down at once."""
    api_servers = [h["name"] for h in cluster.config["baremetal"]["hosts"] if "apiserver" in h["roles"]]
    start_kubelet_standins(cluster, api_servers)
    old = {h: _served_serial(cluster, h) for h in cluster.members}
    since = time.time()
    update, _, _ = apply(cluster, "pki-rotation", lambda cfg: cfg.setdefault("pki", {}).update(rotation=1))
    assert not [n for n in update.named("replace") if "-ca" in n and "etcd-server" not in n], "a CA was replaced"
    for host in cluster.members:
        now = _served_serial(cluster, host)
        assert now != old[host] and now == _declared_serial(cluster, host), f"{host} serves {now}, was {old[host]}"
    down = {h: down_intervals(api_server_events(cluster, h), since) for h in api_servers}
    print("\nFIGURE (local test bed) API server stand-ins down during the pki rotation, seconds: "
          + ", ".join(f"{h} {[round(b - a, 2) for a, b in spans]}" for h, spans in down.items()))
    assert all(down.values()), f"every API server restarts on its new certificates: {down}"
    for (one, spans), (other, others) in itertools.combinations(down.items(), 2):
        for a, b in spans:
            assert all(b <= c or d <= a for c, d in others), f"{one} {a}-{b} and {other} {others}: down at once"


def test_h_an_operator_range_that_locks_out_the_program_is_refused_at_the_first_host(cluster: Cluster) -> None:
    rules = {h: cluster.sandbox.ssh(h, "nft list set inet kcp operators").stdout for h in cluster.members}
    _, _, update = plan(cluster, lambda cfg: cfg["baremetal"].update(operatorCidrs=["192.0.2.0/24"]))
    print(f"\n== operators-lockout: `pulumi preview`\n{update.preview()}")
    run = cluster.replay.run(update)
    assert not run.ok
    (failed,) = run.failed
    assert failed.name == "local-h1-firewall" and "refusing the new firewall" in failed.output, run.report()
    for host in cluster.members:
        assert cluster.sandbox.ssh(host, "nft list set inet kcp operators").stdout == rules[host], host


def test_h_an_operator_range_change_goes_host_by_host(cluster: Cluster) -> None:
    _, run, _ = apply(cluster, "operators", lambda cfg: cfg["baremetal"]["operatorCidrs"].append("192.0.2.0/24"))
    firewalls = sorted((r.started, r.name) for r in run.results if r.name.endswith("-firewall"))
    for (_, previous), (started, _) in itertools.pairwise(firewalls):
        ended = next(r.started + r.seconds for r in run.results if r.name == previous)
        assert started >= ended - 0.01, f"firewalls changed together: {firewalls}"
    for host in cluster.members:
        assert "192.0.2.0/24" in cluster.sandbox.ssh(host, "nft list set inet kcp operators").stdout.decode()


def test_h_a_new_api_vip_moves_the_vip_and_the_etcd_load_balancer(cluster: Cluster) -> None:
    vip = cluster.config["baremetal"]["apiVip"].rsplit(".", 1)[0] + ".101"
    apply(cluster, "api-vip", lambda cfg: cfg["baremetal"].update(apiVip=vip))
    holders = [h for h in cluster.members
               if f" {vip}/" in cluster.sandbox.ssh(h, "ip -4 -o addr show dev eth0").stdout.decode()]
    assert len(holders) == 1, f"the new VIP {vip} is held by {holders}"
    ca, cert, key = cluster.tls
    probe = cluster.sandbox.run_in_netns("backup", ["env", "ETCDCTL_API=3", "etcdctl", f"--endpoints=https://{vip}:2379",
                                                    f"--cacert={ca}", f"--cert={cert}", f"--key={key}",
                                                    "endpoint", "health"], timeout=30)
    assert probe.returncode == 0, probe.stderr.decode()


def _host(name: str, zone: str, c: Cluster) -> dict[str, Any]:
    """A stack entry for a test host, its host key pinned as an operator would (checked out of band)."""
    return {"name": name, "address": c.sandbox.address(name), "zone": zone,
            "roles": ["etcd", "apiserver", "loadbalancer"], "hostKey": c.sandbox.host_key(name)}


def _voters(c: Cluster) -> list[str]:
    listed = json.loads(c.etcdctl("member", "list", "-w", "json").stdout)["members"]
    return sorted(m.get("name", "") for m in listed if not m.get("isLearner"))


def _why(c: Cluster, hosts: list[str]) -> str:
    """What a failed membership check needs to be understood: the member list and the hosts' etcd journals."""
    listed = c.etcdctl("member", "list", "-w", "table").stdout.decode()
    journals = [f"--- {h}\n" + c.sandbox.ssh(h, "journalctl -o short-monotonic --no-pager -n 80 -u etcd "
                                             "-u etcd-member-promote -u etcd-spare-watch -u 'kcp-*'",
                                             check=False).stdout.decode() for h in hosts]
    return "\n".join([listed, *journals])


def test_e_three_to_five_members_join_one_at_a_time(cluster: Cluster) -> None:
    pids = cluster.main_pids(cluster.members)

    def grow(cfg: dict[str, Any]) -> None:
        cfg["baremetal"]["hosts"] += [_host("h4", "rack-a", cluster), _host("h5", "rack-b", cluster)]
        cfg["etcd"]["members"] = cfg["apiServers"]["count"] = 5

    apply(cluster, "grow-to-5", grow)
    assert _voters(cluster) == ["h1", "h2", "h3", "h4", "h5"], _why(cluster, ["h4", "h5", "h1", "spare1"])
    assert {h: p for h, p in cluster.main_pids(["h1", "h2", "h3"]).items()} == pids, "growing restarted a member"


def test_e_five_to_three_members_leave_one_at_a_time(cluster: Cluster) -> None:
    def shrink(cfg: dict[str, Any]) -> None:
        cfg["baremetal"]["hosts"] = [h for h in cfg["baremetal"]["hosts"] if h["name"] not in ("h4", "h5")]
        cfg["etcd"]["members"] = cfg["apiServers"]["count"] = 3

    # Writes go on 45 s after the leavers stopped their keepalived (their deletes run last): clients' ARP entries for
    # the VIP expire in 15-45 s, so a leaver that held it would show as a gap this long.
    update, _, seen = apply(cluster, "shrink-to-3", shrink, after_seconds=45)
    claims = {h: cluster.sandbox.ssh(h, "journalctl -u keepalived --no-pager | grep -c 'Entering MASTER STATE'",
                                     check=False).stdout.decode().strip() for h in ("h4", "h5")}
    print(f"VIP claims by the leaving load balancers while they left: {claims}")
    assert seen.gap("lb") <= 5, f"the VIP's writer waited {seen.gap('lb'):.1f}s: a leaver kept the VIP"
    assert update.named("delete") and all(("-h4" in n or "-h5" in n) for n in update.named("delete")), \
        update.preview()
    assert _voters(cluster) == ["h1", "h2", "h3"]
    for host in ("h4", "h5"):
        state = cluster.sandbox.ssh(host, "systemctl is-enabled etcd; systemctl is-active etcd", check=False)
        assert b"enabled" not in state.stdout.split() and b"\nactive" not in b"\n" + state.stdout, host


def test_g_adopting_a_spares_takeover_restarts_no_healthy_member(cluster: Cluster) -> None:
    sandbox = cluster.sandbox
    sandbox.kill_host("h3")  # gone for good: the spare takes its slot
    sandbox.ssh("spare1", "mkdir -p /run/systemd/system/etcd-spare-watch.service.d && printf '[Service]\\n"
                          "Environment=KCP_SPARE_TAKEOVER_AFTER_SECONDS=10\\n' > /run/systemd/system/"
                          "etcd-spare-watch.service.d/test.conf && systemctl daemon-reload")
    deadline = time.monotonic() + 180
    while sandbox.ssh("spare1", "test -e /var/lib/kcp/takeover.json", check=False).returncode != 0:
        assert time.monotonic() < deadline, "no takeover within 180 s"
        sandbox.ssh("spare1", "systemctl start etcd-spare-watch.service", check=False, timeout=600)
        time.sleep(3)
    cluster.program = forget(cluster.program, "h3")  # a dead host runs no delete step: `pulumi state delete` it
    pids = cluster.main_pids(["h1", "h2", "spare1"])

    def adopt(cfg: dict[str, Any]) -> None:
        cfg["baremetal"]["hosts"] = [h for h in cfg["baremetal"]["hosts"] if h["name"] != "h3"]
        cfg["baremetal"]["hosts"].append(_host("spare1", "rack-c", cluster))
        cfg["baremetal"]["spares"] = []

    apply(cluster, "adopt-takeover", adopt)
    assert _voters(cluster) == ["h1", "h2", "spare1"]
    assert cluster.main_pids(["h1", "h2", "spare1"]) == pids, "adopting the takeover restarted a healthy member"


def test_f_a_dead_host_replaced_by_a_new_one_at_a_new_address(cluster: Cluster) -> None:
    cluster.sandbox.kill_host("h2")
    cluster.program = forget(cluster.program, "h2")

    def replace(cfg: dict[str, Any]) -> None:
        cfg["baremetal"]["hosts"] = [h if h["name"] != "h2" else _host("h6", "rack-b", cluster)
                                     for h in cfg["baremetal"]["hosts"]]

    apply(cluster, "replace-dead-host", replace)
    assert _voters(cluster) == ["h1", "h6", "spare1"]
