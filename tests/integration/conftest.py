"""The `local` stack, deployed for real on local test hosts by replaying what the program declares.

`local_cluster` (module scope) boots fresh hosts, runs the Pulumi program under mocks
that issue real certificates, replays its SSH commands onto the hosts, and tears
everything down afterwards, also when a test fails. Set KCP_TEST_SANDBOX=name:subnet
(e.g. `bk:10.250.7`) to run beside another test bed.

Note the firewall: only API servers, load balancers, the backup host and members/spares
may reach etcd's client port. Talk to etcd from the test machine inside the backup
host's network namespace (`sandbox.run_in_netns(backup_host, ...)`) or over SSH.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from testbed.image import STATE_ROOT
from testbed.sandbox import Sandbox
from testbed.system import held_alone, log
from tests.integration.realtls import RealTlsMocks, plain
from tests.integration.replay import Replay
from tests.program import ROOT, Program, run_program, stack_config

LOCAL_STACK = ROOT / "stacks" / "Pulumi.local.yaml"


def _require_testbed() -> None:
    if os.geteuid() != 0:
        pytest.skip(reason="integration tests boot systemd-nspawn test hosts, which needs root: "
                           "run `sudo scripts/test`")
    for tool in ("systemd-nspawn", "debootstrap", "ip", "ssh"):
        if shutil.which(tool) is None:
            pytest.skip(reason=f"integration tests need {tool} to build test hosts: "
                               "`sudo scripts/install-deps` installs it")


def sandbox_identity() -> tuple[str, str]:
    name, _, subnet = os.environ.get("KCP_TEST_SANDBOX", "kcp:10.250.0").partition(":")
    return name, subnet


#: How long a second run waits for the first: longer than a whole integration run (34 min on the local test bed),
#: shorter than CI's 90-minute limit, so a run stuck behind a hung one fails saying which pid to stop.
RUN_PATIENCE = 45 * 60


@pytest.fixture(scope="session", autouse=True)
def one_integration_run_at_a_time(pytestconfig: pytest.Config) -> Iterator[None]:
    """Two runs of these tests on one machine (a CI job beside a developer's) boot test hosts of the same names:
    the second would deploy onto the first one's hosts and tear them down under it (ci31). It waits instead."""
    if os.geteuid() != 0:  # no test bed without root: every test here skips and says why
        yield
        return
    with contextlib.ExitStack() as held:
        with pytestconfig.pluginmanager.getplugin("capturemanager").global_and_fixture_disabled():
            held.enter_context(held_alone(STATE_ROOT / "integration-tests.lock", patience=RUN_PATIENCE))
        yield


@contextlib.contextmanager
def fresh_sandbox(hosts: Mapping[str, str]) -> Iterator[Sandbox]:
    """`hosts` booted for one module and torn down after it. Hosts of that sandbox name that already run are never
    adopted with what they hold: those of a run killed before its teardown are taken down first, any others
    (`scripts/sandbox up`, `scripts/up local`, a live holder) refused."""
    name, subnet = sandbox_identity()
    sandbox = Sandbox(name=name, subnet=subnet, hosts=hosts)
    if running := sandbox.running():
        if (holder := sandbox.dead_holder()) is None:
            raise RuntimeError(f"sandbox {name} already runs {', '.join(running)}: take it down (scripts/sandbox "
                               f"down --name {name}) or run the tests beside it (KCP_TEST_SANDBOX=NAME:10.250.N)")
        log(f"taking down {', '.join(running)} of sandbox {name}: pid {holder.pid}, which booted them, was killed "
            "before its teardown")
        sandbox.down()
    with sandbox:
        yield sandbox


def local_stack_for(subnet: str, key_path: Path) -> dict[str, Any]:
    """The shipped `local` stack, moved onto `subnet` and the sandbox whose SSH key is `key_path`: its hosts'
    own host keys, from the inventory that `up` wrote beside the key, are pinned, so every connection is
    verified as on real machines (no trust on first use)."""
    text = json.dumps(stack_config(LOCAL_STACK)).replace("10.250.0.", f"{subnet}.")
    cfg = json.loads(text)
    bm = cfg["baremetal"]
    bm["sshPrivateKeyPath"] = str(key_path)
    inventory = json.loads(key_path.with_name("hosts.json").read_text())
    keys = {h["address"]: h["host_key"] for h in inventory["hosts"]}
    for host in (*bm["hosts"], *bm["spares"], bm["backupHost"]):
        host["hostKey"] = keys[host["address"]]
    bm["trustOnFirstUse"] = False
    return cfg


@dataclass
class Deployment:
    sandbox: Sandbox
    program: Program
    replay: Replay
    config: dict[str, Any]
    workdir: Path
    members: list[str] = field(default_factory=list)
    spares: list[str] = field(default_factory=list)
    backup_host: str = "backup"

    @property
    def stack_file(self) -> Path:
        """A stack config file pointing at these hosts (for scripts/etcd-restore and friends), as configured now."""
        path = self.workdir / "Pulumi.local.yaml"
        path.write_text(yaml.safe_dump({"config": {f"resilient-control-plane:{k}": v for k, v in self.config.items()}}))
        return path

    @property
    def client_endpoints(self) -> list[str]:
        return [f"https://{self.sandbox.address(m)}:2379" for m in self.members]

    @property
    def api_vip(self) -> str:
        return self.config["baremetal"]["apiVip"]

    @property
    def client_tls(self) -> tuple[Path, Path, Path]:
        """CA, the API servers' etcd client certificate and key, as local files."""
        names = {"ca.crt": "local-pki-etcd-ca", "client.crt": "local-pki-apiserver-etcd-client"}
        out = self.workdir / "tls"
        out.mkdir(exist_ok=True)
        for file, resource in names.items():
            (out / file).write_text(self.output(resource, "certPem"))
        (out / "client.key").write_text(self.output("local-pki-apiserver-etcd-client-key", "privateKeyPem"))
        (out / "client.key").chmod(0o600)
        return out / "ca.crt", out / "client.crt", out / "client.key"

    def output(self, resource: str, key: str) -> str:
        return plain(self.program.outputs[resource][key])

    def etcdctl(self, host: str, *args: str, check: bool = True,
                timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
        """etcdctl on `host` with its own member certificate, against every member."""
        command = (". /etc/etcd/cluster.env && ETCDCTL_API=3 etcdctl --endpoints=\"$KCP_CLIENT_ENDPOINTS\" "
                   "--cacert=\"$KCP_ETCD_CA\" --cert=\"$KCP_ETCD_CERT\" --key=\"$KCP_ETCD_KEY\" "
                   + " ".join(shlex.quote(a) for a in args))
        return self.sandbox.ssh(host, command, timeout=timeout, check=check)

    def redeploy_host(self, host: str) -> None:
        """What `pulumi up` does for a replaced machine, once its new host key is pinned in the stack: run that
        host's steps again."""
        key, address = self.sandbox.host_key(host), self.sandbox.address(host)
        bm = self.config["baremetal"]
        for entry in (*bm["hosts"], *bm["spares"], bm["backupHost"]):
            if entry["address"] == address:
                entry["hostKey"] = key
        self.replay.pin(host, key)
        self.replay.create(self.replay.for_host(host))


@contextlib.contextmanager
def deployed(workdir_prefix: str, configure: Callable[[dict[str, Any], Sandbox], None] | None = None,
             extra_hosts: Mapping[str, int] | None = None) -> Iterator[Deployment]:
    """Fresh hosts for the `local` stack (plus an outsider in no role), the program run under mocks that issue
    real certificates, its commands replayed onto them; everything torn down afterwards, also on failure.
    `extra_hosts` (name: last address byte) boot too, for `configure` to place in the stack config it may change."""
    _require_testbed()
    _, subnet = sandbox_identity()
    cfg0 = stack_config(LOCAL_STACK)
    hosts = {h["name"]: h["address"].replace("10.250.0.", f"{subnet}.")
             for h in [*cfg0["baremetal"]["hosts"], *cfg0["baremetal"]["spares"]]}
    hosts["backup"] = cfg0["baremetal"]["backupHost"]["address"].replace("10.250.0.", f"{subnet}.")
    hosts["outsider"] = f"{subnet}.30"  # in no role: what the firewall must keep out
    hosts |= {host: f"{subnet}.{byte}" for host, byte in (extra_hosts or {}).items()}
    with fresh_sandbox(hosts) as sandbox, tempfile.TemporaryDirectory(prefix=workdir_prefix) as tmp:
        cfg = local_stack_for(subnet, sandbox.ssh_key_path)
        if configure is not None:
            configure(cfg, sandbox)
        program = run_program(cfg, stack="local", mocks=RealTlsMocks)
        replay = Replay.of(sandbox, program)
        replay.first_up(program)
        yield Deployment(sandbox, program, replay, cfg, Path(tmp),
                         members=[h["name"] for h in cfg["baremetal"]["hosts"] if "etcd" in h["roles"]],
                         spares=[s["name"] for s in cfg["baremetal"]["spares"]])


@pytest.fixture(scope="module")
def local_cluster() -> Iterator[Deployment]:
    with deployed("kcp-deploy-") as deployment:
        yield deployment


