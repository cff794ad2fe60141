"""Host keys on real hosts: a machine that answers with another SSH host key receives nothing.

The `local` stack is deployed with every host's own key pinned (conftest.local_stack_for), by a replay
that checks keys as pulumi-command does. A host then presents another key, as a machine answering in its
place would: the program's steps, the backup job and the restore's ssh are refused before a byte is sent.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from components.restore.plan import build_plan, parser
from kcp_host.contract import AGENT, BACKUP_SSH_KNOWN_HOSTS
from testbed.sandbox import Sandbox
from testbed.system import keygen
from tests.integration.conftest import Deployment

pytestmark = pytest.mark.integration

REFUSED = "Host key verification failed"
# What the steps of an API server and etcd member ship: the agent, its identity, the Kubernetes CA key, the
# service-account signing key, the encryption-at-rest key, etcd's keys and the backup host's login key.
SHIPPED = (AGENT, "/etc/kcp/host-identity", "/etc/kubernetes/pki/ca.key", "/etc/kubernetes/pki/sa.key",
           "/etc/kubernetes/encryption/encryption-config.yaml", "/etc/etcd/pki/server.key", "/etc/etcd/pki/peer.key",
           "/etc/etcd/backup-ssh/id_ed25519")


def presented_key(sandbox: Sandbox, host: str) -> str:
    """The ed25519 key the host's sshd presents right now (ssh-keyscan from this machine)."""
    out = subprocess.run(["ssh-keyscan", "-T", "5", "-t", "ed25519", sandbox.address(host)], capture_output=True,
                         text=True, timeout=30, check=True).stdout
    return " ".join(next(line for line in out.splitlines() if not line.startswith("#")).split()[1:3])


@contextmanager
def impostor(sandbox: Sandbox, host: str) -> Iterator[None]:
    """The host's sshd presents a new key, as another machine answering at its address would; then its own again."""
    ssh_dir = sandbox.host_dir(host) / "etc/ssh"
    own = [ssh_dir / "ssh_host_ed25519_key", ssh_dir / "ssh_host_ed25519_key.pub"]
    for path in own:
        path.rename(path.with_name(path.name + ".own"))
    try:
        keygen(own[0], f"impostor@{host}")
        sandbox.exec_in_host(host, ["systemctl", "restart", "ssh.service"])
        sandbox.wait_ssh(host)
        yield
    finally:
        for path in own:
            path.with_name(path.name + ".own").replace(path)
        sandbox.exec_in_host(host, ["systemctl", "restart", "ssh.service"])
        sandbox.wait_ssh(host)


def test_every_step_was_deployed_over_a_connection_pinned_to_its_hosts_own_key(local_cluster: Deployment) -> None:
    dep = local_cluster
    hosts = {dep.replay.host_of(step.address) for step in dep.replay.steps}
    presented = {host: presented_key(dep.sandbox, host) for host in hosts}
    assert hosts == {*dep.members, *dep.spares, dep.backup_host}
    for step in dep.replay.steps:
        host = dep.replay.host_of(step.address)
        assert step.host_key == dep.sandbox.host_key(host) == presented[host], step.name


def backup_run(dep: Deployment, member: str) -> subprocess.CompletedProcess[bytes]:
    """One etcd-backup run as the timer starts it, on this member even if it is not the leader."""
    return dep.sandbox.ssh(member, f"{AGENT} etcd-backup --any-member", check=False, timeout=600)


def arrived_since(dep: Deployment, marker: str) -> list[str]:
    root = f"/srv/etcd-backups/{dep.config['clusterName']}"
    out = dep.sandbox.ssh(dep.backup_host, f"find {root} -type f -newer {marker}").stdout.decode()
    return out.split()


def test_the_backup_job_uploads_to_the_pinned_backup_host_only(local_cluster: Deployment) -> None:
    dep, member = local_cluster, local_cluster.members[0]
    for host in (*dep.members, *dep.spares):
        dep.sandbox.ssh(host, "systemctl stop etcd-backup.timer", check=False)  # no slot fires meanwhile
        known = dep.sandbox.ssh(host, f"cat {BACKUP_SSH_KNOWN_HOSTS}").stdout.decode()
        assert known == f"{dep.sandbox.address(dep.backup_host)} {dep.sandbox.host_key(dep.backup_host)}\n", host
    marker = "/run/kcp-host-keys-marker"
    dep.sandbox.ssh(dep.backup_host, f"touch {marker}")
    done = backup_run(dep, member)
    assert done.returncode == 0, done.stderr.decode()
    assert arrived_since(dep, marker), "the pinned backup host received no snapshot"

    dep.sandbox.ssh(dep.backup_host, f"touch {marker}")
    with impostor(dep.sandbox, dep.backup_host):
        refused = backup_run(dep, member)
        assert refused.returncode != 0 and REFUSED in refused.stderr.decode(), refused.stderr.decode()
        assert arrived_since(dep, marker) == [], "a backup host with another key received files"
    known = dep.sandbox.ssh(member, f"cat {BACKUP_SSH_KNOWN_HOSTS}").stdout.decode()
    assert dep.sandbox.host_key(dep.backup_host) in known, "the job must not learn the other key"


def test_a_host_presenting_another_key_receives_no_bundle_until_its_key_is_pinned(local_cluster: Deployment) -> None:
    dep, victim = local_cluster, local_cluster.members[-1]
    pinned = dep.sandbox.host_key(victim)
    restore = build_plan(parser(None).parse_args(["--stack", str(dep.stack_file)])).ssh
    address = dep.sandbox.address(victim)
    assert restore.run(address, "true").returncode == 0, "the restore's ssh accepts the pinned key"
    restore.close([address])
    # A machine with an empty disk answers at the victim's address: it made its own host key.
    dep.sandbox.kill_host(victim)
    dep.sandbox.start_host(victim, wipe=True)
    assert presented_key(dep.sandbox, victim) != pinned
    steps = dep.replay.for_host(victim)
    assert steps and all(step.host_key == pinned for step in steps)
    for step in steps:  # each one alone: none may get through, not only the first
        with pytest.raises(AssertionError, match=REFUSED):
            dep.replay.create([step])
    root = dep.sandbox.host_dir(victim)
    assert [path for path in SHIPPED if (root / path.lstrip("/")).exists()] == [], "a refused step delivered files"
    refused = restore.run(address, "true")
    assert refused.returncode == 255 and REFUSED in refused.stderr.decode(), "scripts/etcd-restore's ssh"
    restore.close([address])

    # The operator checks the new machine's key and pins it: the same steps now deliver.
    dep.redeploy_host(victim)
    assert all((root / path.lstrip("/")).exists() for path in SHIPPED)
