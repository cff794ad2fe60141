"""Integration test of the test bed itself: real containers, namespaces and ssh.

The other integration tests trust the sandbox's fault injections (a crashed
host is really dead, a partition really drops traffic, a wiped host really has
an empty disk); this file checks each of them against the real thing.

The hosts run the default suite, trixie; one extra bookworm host checks that
the suite kept for Debian's etcd 3.4 still boots, and that replacing a host
never changes its release.

Uses its own sandbox names and subnets, so a developer's `scripts/sandbox up`
(name `kcp`, 10.250.0.0/24) keeps running while it does.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# The repo root, so that plain `pytest` (no pythonpath configured) imports testbed too.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from testbed import Sandbox, SshError
from testbed.image import image_dir
from testbed.network import bridge_name, link_exists, netns_exists
from testbed.sandbox import CGROUP_TREES
from testbed.system import wait_until
from tests.integration.conftest import fresh_sandbox

NAME = "kcptest"
SUBNET = "10.250.9"
HOSTS = {"t1": "10.250.9.11", "t2": "10.250.9.12"}
BOOKWORM_NAME = "kcpbw"
BOOKWORM_SUBNET = "10.250.6"
BOOKWORM_HOSTS = {"b1": "10.250.6.11"}
#: What the host agent imports (standard library; python3-minimal lacks json, concurrent.futures, urllib, tarfile).
AGENT_MODULES = ("json", "argparse", "subprocess", "concurrent.futures", "urllib.request", "tarfile", "hashlib",
                 "selectors", "fcntl", "ssl")
MISSING_TOOLS = [t for t in ("systemd-nspawn", "debootstrap", "ip", "ssh") if not shutil.which(t)]

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="the test hosts need root (network namespaces, bridges, "
                       "systemd-nspawn); runs when scripts/test is run as root or by a user who may sudo"),
    pytest.mark.skipif(bool(MISSING_TOOLS), reason=f"missing tools {MISSING_TOOLS}; runs once scripts/install-deps "
                       "(as root) has installed them"),
]


@pytest.fixture(scope="module")
def sandbox() -> Iterator[Sandbox]:
    """Two hosts for the whole module; torn down even when a test fails."""
    with Sandbox(NAME, SUBNET, HOSTS) as sb:
        yield sb


def tcp_probe(sb: Sandbox, src: str, dst: str, port: int = 22) -> bool:
    """True when src's namespace can open a TCP connection to dst (3 s bound)."""
    script = f"exec 3<>/dev/tcp/{sb.address(dst)}/{port}"
    proc = sb.run_in_netns(src, ["timeout", "3", "bash", "-c", script], timeout=10)
    return proc.returncode == 0


def remote(sb: Sandbox, host: str, command: str) -> str:
    """stdout of a remote command, stripped."""
    return sb.ssh(host, command).stdout.decode().strip()


def codename(sb: Sandbox, host: str) -> str:
    """The Debian release the host runs, from its own os-release."""
    return remote(sb, host, ". /etc/os-release && echo $VERSION_CODENAME")


def python_version(sb: Sandbox, host: str) -> tuple[int, ...]:
    """python3's version, printed by a script that first imports all the agent needs."""
    script = f"import {', '.join(AGENT_MODULES)}, sys; print(json.dumps(sys.version_info[:2]))"
    return tuple(json.loads(remote(sb, host, f"python3 -c '{script}'")))


def test_hosts_answer_ssh_and_boot_to_running(sandbox: Sandbox) -> None:
    for host, address in HOSTS.items():
        assert remote(sandbox, host, "hostname") == host
        assert remote(sandbox, host, "systemctl is-system-running") == "running"
        eth0 = remote(sandbox, host, "ip -4 -o addr show dev eth0")
        assert eth0.split()[3] == f"{address}/24"


def test_trixie_is_the_default_with_etcd_35_etcdutl_and_python3(sandbox: Sandbox) -> None:
    assert sandbox.suite == "trixie"
    assert codename(sandbox, "t1") == "trixie"
    assert re.search(r"^etcd Version: 3\.5\.\d+$", remote(sandbox, "t1", "etcd --version"), re.M)
    assert re.search(r"^etcdutl version: 3\.5\.\d+$", remote(sandbox, "t1", "etcdutl version"), re.M)
    assert re.search(r"^etcdctl version: 3\.5\.\d+$", remote(sandbox, "t1", "etcdctl version"), re.M)
    assert python_version(sandbox, "t1") >= (3, 11)


def test_hosts_differ_and_have_no_default_route(sandbox: Sandbox) -> None:
    ids = {remote(sandbox, h, "cat /etc/machine-id /etc/ssh/ssh_host_ed25519_key.pub") for h in HOSTS}
    assert len(ids) == len(HOSTS)
    for host in HOSTS:
        assert remote(sandbox, host, "ip route show default") == ""
        routes = sandbox.run_in_netns(host, ["ip", "route", "show", "default"], check=True)
        assert routes.stdout.strip() == b""


def test_deployable_services_are_installed_but_stopped(sandbox: Sandbox) -> None:
    units = "etcd haproxy keepalived nftables"
    enabled = sandbox.ssh("t1", f"systemctl is-enabled {units}", check=False).stdout.decode()
    assert enabled.split() == ["disabled"] * 4
    active = sandbox.ssh("t1", f"systemctl is-active {units}", check=False).stdout.decode()
    assert active.split() == ["inactive"] * 4


def test_type_notify_service_runs_and_kill_process_crashes_it(sandbox: Sandbox) -> None:
    # Debian's etcd.service is Type=notify with Restart=on-abnormal: it only
    # becomes active once etcd has notified systemd, which needs a working
    # notify socket inside the container.
    sandbox.ssh("t1", "systemctl start etcd && etcdctl put /probe ok", timeout=60)
    try:
        assert remote(sandbox, "t1", "systemctl show -p Type --value etcd") == "notify"
        before = int(remote(sandbox, "t1", "systemctl show -p MainPID --value etcd"))
        assert sandbox.kill_process("t1", "etcd") == before
        restarted = "until systemctl is-active -q etcd; do sleep 0.2; done; echo up"
        assert remote(sandbox, "t1", f"timeout 20 sh -c '{restarted}'") == "up"
        assert int(remote(sandbox, "t1", "systemctl show -p MainPID --value etcd")) != before
        assert remote(sandbox, "t1", "systemctl show -p NRestarts --value etcd") == "1"
    finally:
        sandbox.ssh("t1", "systemctl stop etcd", check=False)


def test_one_unit_name_on_two_hosts_is_two_cgroups(sandbox: Sandbox) -> None:
    """Each host's systemd keeps its units in a tree of its own: in one shared tree, one container's cleanup of a
    unit's cgroup broke the same unit starting in another (boots degraded, starts failed with 219/CGROUP)."""
    tree = CGROUP_TREES[0]
    if not (tree / "cgroup.procs").exists():
        pytest.skip(reason=f"this machine has no cgroup-v1 name=systemd tree at {tree}: nothing is shared there")
    for host in HOSTS:
        sandbox.ssh(host, "systemd-run --unit=kcp-probe sleep 300")
    try:
        for host in HOSTS:
            procs = tree / sandbox.cgroup_name(host) / "payload/system.slice/kcp-probe.service/cgroup.procs"
            assert wait_until(lambda procs=procs: procs.is_file() and len(procs.read_text().split()) == 1, 10), \
                f"{host}'s kcp-probe is not alone in {procs.parent}"
        assert not (tree / "payload/system.slice/kcp-probe.service").exists(), "a unit in the machine's own tree"
    finally:
        for host in HOSTS:
            sandbox.ssh(host, "systemctl stop kcp-probe", check=False)


def test_partition_cuts_traffic_and_heal_restores_it(sandbox: Sandbox) -> None:
    assert tcp_probe(sandbox, "t1", "t2")
    sandbox.partition("t2")
    try:
        assert not tcp_probe(sandbox, "t1", "t2")
        assert sandbox.ssh("t2", "true", check=False, connect_timeout=2).returncode == 255
        assert tcp_probe(sandbox, "t1", "t1")  # t1 itself is unaffected
    finally:
        sandbox.heal("t2")
    assert tcp_probe(sandbox, "t1", "t2")
    sandbox.wait_ssh("t2", timeout=10)


def test_copy_to_sends_files_and_trees(sandbox: Sandbox, tmp_path: Path) -> None:
    script = tmp_path / "tool.sh"
    script.write_text("#!/bin/sh\necho tool-ran\n")
    script.chmod(0o750)
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "a.txt").write_text("alpha")
    sandbox.copy_to("t2", script, "/usr/local/lib/kcp/tool.sh")
    sandbox.copy_to("t2", tree, "/srv/tree")
    assert remote(sandbox, "t2", "/usr/local/lib/kcp/tool.sh") == "tool-ran"
    assert remote(sandbox, "t2", "stat -c %a /usr/local/lib/kcp/tool.sh") == "750"
    assert remote(sandbox, "t2", "cat /srv/tree/sub/a.txt") == "alpha"


def test_kill_host_really_kills_and_restart_keeps_the_disk(sandbox: Sandbox) -> None:
    sandbox.ssh("t2", "echo kept > /root/marker && sync")
    init = sandbox.container_init("t2")
    sandbox.kill_host("t2")
    assert not sandbox.is_running("t2")
    assert not Path(f"/proc/{init}").exists()
    assert not (sandbox.dir / "hosts" / ".#t2.lck").exists()
    assert not tcp_probe(sandbox, "t1", "t2")
    with pytest.raises(SshError):
        sandbox.ssh("t2", "true", connect_timeout=2)
    sandbox.start_host("t2")
    assert remote(sandbox, "t2", "cat /root/marker") == "kept"
    assert remote(sandbox, "t2", "systemctl is-system-running") == "running"


def test_start_host_with_wipe_is_a_fresh_machine(sandbox: Sandbox) -> None:
    old_id = remote(sandbox, "t2", "cat /etc/machine-id")
    sandbox.ssh("t2", "echo gone > /root/marker")
    with pytest.raises(RuntimeError, match="running"):
        sandbox.start_host("t2", wipe=True)
    sandbox.kill_host("t2")
    sandbox.start_host("t2", wipe=True)
    assert sandbox.ssh("t2", "test -e /root/marker", check=False).returncode == 1
    assert remote(sandbox, "t2", "cat /etc/machine-id") != old_id
    assert remote(sandbox, "t2", "hostname") == "t2"


def test_up_again_keeps_running_hosts(sandbox: Sandbox) -> None:
    pids = {row["name"]: row["pid"] for row in sandbox.status()}
    sandbox.up()
    assert {row["name"]: row["pid"] for row in sandbox.status()} == pids
    inventory = (sandbox.dir / "hosts.json").read_text()
    assert '"10.250.9.12"' in inventory
    assert json.loads(inventory)["suite"] == "trixie"


def test_down_removes_everything_by_name(sandbox: Sandbox) -> None:
    pids = [int(str(row["pid"])) for row in sandbox.status()]
    sandbox.down()
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    assert not link_exists(bridge_name(NAME))
    for host in HOSTS:
        assert not link_exists(sandbox.veth(host))
        assert not netns_exists(sandbox.netns(host))
        assert not sandbox.host_dir(host).exists()
        assert not any((tree / sandbox.cgroup_name(host)).exists() for tree in CGROUP_TREES)
    assert not (sandbox.dir / "disks").exists()
    assert not sandbox.ssh_key_path.exists()
    assert image_dir(sandbox.root, sandbox.suite).is_dir()  # the cached image stays
    sandbox.down()  # idempotent


def test_context_manager_tears_down_on_failure() -> None:
    sb = Sandbox("kcpcm", "10.250.8", {"c1": "10.250.8.11"})
    with pytest.raises(RuntimeError, match="boom"), sb:
        assert sb.is_running("c1")
        raise RuntimeError("boom")
    assert not link_exists(bridge_name("kcpcm"))
    assert not netns_exists(sb.netns("c1"))
    assert not sb.host_dir("c1").exists()


def test_a_deployment_refuses_hosts_of_its_name_that_already_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """Adopted, they would get a second cluster's commands and be torn down under whoever booted them (ci31)."""
    monkeypatch.setenv("KCP_TEST_SANDBOX", "kcpcm:10.250.8")
    with Sandbox("kcpcm", "10.250.8", {"c1": "10.250.8.11"}) as running:
        with pytest.raises(RuntimeError, match="sandbox kcpcm already runs c1: take it down"), \
                fresh_sandbox({"c1": "10.250.8.11", "c2": "10.250.8.12"}):
            pass
        assert running.running() == ["c1"] and running.is_running("c1")
    assert running.running() == []


# A process that holds a sandbox until it is killed: a test run or a CI job that is cancelled.
HOLDS_A_SANDBOX = """
import time
from testbed import Sandbox
with Sandbox("kcpst", "10.250.5", {"k1": "10.250.5.11"}):
    print("up", flush=True)
    time.sleep(600)
"""


def test_sigterm_to_the_holder_tears_its_hosts_down() -> None:
    holder = subprocess.Popen([sys.executable, "-c", HOLDS_A_SANDBOX], cwd=Path(__file__).resolve().parents[2],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    sb = Sandbox("kcpst", "10.250.5", {"k1": "10.250.5.11"})
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"up\n", holder.communicate()[1].decode()
        assert sb.running() == ["k1"]
        holder.send_signal(signal.SIGTERM)
        _, err = holder.communicate(timeout=120)
        assert holder.returncode != 0 and b"KeyboardInterrupt: signal 15" in err, err.decode()
        assert sb.running() == [] and not sb.host_dir("k1").exists() and not link_exists(bridge_name("kcpst"))
    finally:
        holder.kill()
        sb.down()  # what the holder should have done, when it did not


def test_hosts_a_killed_run_left_are_taken_down_by_the_next_deployment(monkeypatch: pytest.MonkeyPatch) -> None:
    """A SIGKILL runs no teardown: the hosts outlive their holder. Refused, they would fail every later run on
    this machine until someone took them down by hand; adopted, they would keep what the dead run wrote."""
    monkeypatch.setenv("KCP_TEST_SANDBOX", "kcpst:10.250.5")
    holder = subprocess.Popen([sys.executable, "-c", HOLDS_A_SANDBOX], cwd=Path(__file__).resolve().parents[2],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    sb = Sandbox("kcpst", "10.250.5", {"k1": "10.250.5.11"})
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"up\n", holder.communicate()[1].decode()
        sb.ssh("k1", "touch /root/written-by-the-killed-run")
        holder.kill()
        holder.wait(timeout=30)
        assert sb.running() == ["k1"] and sb.dead_holder() is not None
        with fresh_sandbox({"k1": "10.250.5.11"}) as fresh:
            assert fresh.running() == ["k1"] and fresh.dead_holder() is None
            assert fresh.ssh("k1", "test -e /root/written-by-the-killed-run", check=False).returncode == 1
        assert sb.running() == []
    finally:
        holder.kill()
        sb.down()


def test_names_and_addresses_are_validated() -> None:
    with pytest.raises(ValueError, match="sandbox name"):
        Sandbox("much-too-long-name", SUBNET, HOSTS)
    with pytest.raises(ValueError, match="share address"):
        Sandbox(NAME, SUBNET, {"a": "10.250.9.11", "b": "10.250.9.11"})
    with pytest.raises(ValueError, match="not a host address"):
        Sandbox(NAME, SUBNET, {"a": "10.250.7.11"})
    with pytest.raises(ValueError, match="private"):
        Sandbox(NAME, "8.8.8", {"a": "8.8.8.11"})
    with pytest.raises(ValueError, match="suite 'buster'"):
        Sandbox(NAME, SUBNET, HOSTS, suite="buster")
    long_host = Sandbox(NAME, SUBNET, {"averyveryverylonghostname": "10.250.9.30"})
    assert len(long_host.veth("averyveryverylonghostname")) <= 15


# ----- bookworm: last in the file, so its host is up only for these tests ----


@pytest.fixture(scope="module")
def bookworm() -> Iterator[Sandbox]:
    """One bookworm host, the suite kept for tests that need Debian's etcd 3.4."""
    with Sandbox(BOOKWORM_NAME, BOOKWORM_SUBNET, BOOKWORM_HOSTS, suite="bookworm") as sb:
        yield sb


def test_bookworm_hosts_keep_etcd_34_and_boot_to_running(bookworm: Sandbox) -> None:
    assert remote(bookworm, "b1", "systemctl is-system-running") == "running"
    assert codename(bookworm, "b1") == "bookworm"
    assert re.search(r"^etcd Version: 3\.4\.\d+$", remote(bookworm, "b1", "etcd --version"), re.M)
    assert re.search(r"^etcdctl version: 3\.4\.\d+$", remote(bookworm, "b1", "etcdctl version"), re.M)
    assert bookworm.ssh("b1", "command -v etcdutl", check=False).returncode == 1  # 3.4 has none
    assert python_version(bookworm, "b1") >= (3, 11)


def test_a_replaced_host_keeps_the_sandbox_suite(bookworm: Sandbox) -> None:
    attached = Sandbox(BOOKWORM_NAME, BOOKWORM_SUBNET)  # the default suite, trixie
    with pytest.raises(ValueError, match="runs Debian bookworm"):
        attached.up()
    attached.kill_host("b1")  # killing needs no suite, and must not change the recorded one
    with pytest.raises(ValueError, match="runs Debian bookworm"):
        attached.start_host("b1", wipe=True)
    bookworm.start_host("b1", wipe=True)
    assert codename(bookworm, "b1") == "bookworm"
    assert remote(bookworm, "b1", "systemctl is-system-running") == "running"
