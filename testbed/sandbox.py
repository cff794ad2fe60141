"""Real test hosts: systemd-nspawn containers in their own network namespaces.

A `Sandbox` gives each host a full Debian root filesystem (the cached base image
of its suite, trixie unless asked otherwise, below an overlay that keeps the host's
own writes), a network namespace
joined to a bridge, a booted systemd with sshd, and the fault injections the
resilience tests need: crash a host, crash a process, partition a host, replace
a host by one with an empty disk.  All hosts of a sandbox run one suite, which
is recorded with the sandbox: a replaced host comes back on the same release.

Everything the sandbox creates is named after it (bridge `<name>br0`, netns
`<name>-<host>`, directory /var/lib/kcp-sandbox/<name>), and every process it
starts is recorded by pid and start time in a state file, so `down` removes
exactly what `up` made, by name and by pid, and never touches anything else.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import shlex
import signal
import subprocess
import tarfile
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, NoReturn, Self

from testbed import image, network
from testbed.system import SYSTEM_PATH, ProcessId, children_of, keygen, log, run, wait_until

STATE_ROOT = image.STATE_ROOT
DEFAULT_NAME = "kcp"
DEFAULT_SUBNET = "10.250.0"

#: The hosts of the project's `local` stack: etcd+API+LB on h1-h3, a backup host, a spare.
LOCAL_STACK_HOSTS: dict[str, str] = {
    "h1": "10.250.0.11",
    "h2": "10.250.0.12",
    "h3": "10.250.0.13",
    "backup": "10.250.0.20",
    "spare1": "10.250.0.14",
}

BOOT_TIMEOUT = 60.0
STOP_TIMEOUT = 20.0
CGROUP_TREES = (Path("/sys/fs/cgroup/systemd"), Path("/sys/fs/cgroup/unified"))


def _interrupt(signum: int, frame: FrameType | None) -> NoReturn:
    raise KeyboardInterrupt(f"signal {signum}")


def _sigterm_interrupts() -> Callable[[], object]:
    """SIGTERM raises KeyboardInterrupt from now on (in the main thread, the only one Python gives signals to);
    returns what puts the handler before it back."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    before = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, _interrupt)
    return lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL if before is None else before)


class SshError(subprocess.CalledProcessError):
    """A failed remote command; unlike CalledProcessError its message shows stderr."""

    def __str__(self) -> str:
        err = (self.stderr or b"").decode(errors="replace").strip()
        return f"{super().__str__()}\n{err}"


class Sandbox:
    """A named set of test hosts on one private /24.

    Use it as a context manager in tests: `down()` then runs on every exit,
    including failures, so no container, namespace or bridge outlives a test.
    """

    def __init__(
        self,
        name: str = DEFAULT_NAME,
        subnet: str = DEFAULT_SUBNET,
        hosts: Mapping[str, str] | None = None,
        root: Path = STATE_ROOT,
        boot_timeout: float = BOOT_TIMEOUT,
        suite: str = image.DEFAULT_SUITE,
    ) -> None:
        """Validate names, addresses and suite now, before anything is created."""
        image.check_suite(suite)
        self.name = name
        self.subnet = subnet
        self.suite = suite
        self.hosts: dict[str, str] = dict(hosts or {})
        self.root = root
        self.dir = root / name
        self.boot_timeout = boot_timeout
        self.timings: dict[str, float] = {}
        self._children: dict[str, subprocess.Popen[bytes]] = {}
        self._sigterm_restores: list[Callable[[], object]] = []  # one per `with` of this object, innermost last
        network.validate_names(name, list(self.hosts))
        network.validate_addresses(subnet, self.hosts)

    # ----- names and paths -------------------------------------------------

    @property
    def ssh_key_path(self) -> Path:
        """Private key accepted by root on every host of this sandbox."""
        return self.dir / "id_ed25519"

    @property
    def bridge(self) -> str:
        """The bridge interface in the root namespace."""
        return network.bridge_name(self.name)

    @property
    def gateway(self) -> str:
        """This machine's own address on the sandbox bridge."""
        return network.gateway_address(self.subnet)

    def address(self, host: str) -> str:
        """IPv4 address of a host."""
        return self._known_hosts()[host]

    def host_key(self, host: str) -> str:
        """The SSH host key the host made at creation, `TYPE BASE64`: what a stack pins as its hostKey."""
        return " ".join((self.host_dir(host) / "etc/ssh/ssh_host_ed25519_key.pub").read_text().split()[:2])

    def netns(self, host: str) -> str:
        """Network namespace name of a host."""
        return network.netns_name(self.name, host)

    def veth(self, host: str) -> str:
        """Root-side veth of a host (down = partitioned)."""
        return network.veth_name(self.name, host)

    def host_dir(self, host: str) -> Path:
        """The host's root filesystem."""
        return self.dir / "hosts" / host

    def _disk_layers(self, host: str) -> Path:
        """What the host wrote over the image (overlayfs upper and work directories)."""
        return self.dir / "disks" / host

    def _cgroups(self, host: str) -> list[Path]:
        """The host's own cgroup in each tree its systemd writes units into (cgroup v1 `name=systemd` and the
        unified v2 tree; nspawn mounts the other controllers read-only). There is no systemd on this machine to
        give each container a scope, and nspawn --keep-unit keeps the cgroup it starts in: without these, every
        container's `system.slice/<unit>` is one directory, and one container's cleanup of a unit breaks the same
        unit starting in another (boots degraded, starts failed with 219/CGROUP, stops waited for the others)."""
        groups = []
        for tree in CGROUP_TREES:
            if (tree / "cgroup.procs").exists():
                group = tree / self.cgroup_name(host)
                group.mkdir(exist_ok=True)
                groups.append(group)
        return groups

    def cgroup_name(self, host: str) -> str:
        """The host's own cgroup, directly below each tree's root."""
        return f"kcp-{self.name}-{host}"

    def _remove_cgroups(self, host: str) -> None:
        """Remove the host's cgroups, deepest first, once nothing runs in them."""
        for tree in CGROUP_TREES:
            top = tree / self.cgroup_name(host)
            if top.is_dir():
                for path, _, _ in sorted(os.walk(top), key=lambda entry: -len(entry[0])):
                    with contextlib.suppress(OSError):  # busy: a process lingers; the empty group is harmless
                        os.rmdir(path)

    def _lock_file(self, host: str) -> Path:
        """The lock systemd-nspawn keeps beside a running container's directory."""
        return self.dir / "hosts" / f".#{host}.lck"

    def _log_file(self, host: str) -> Path:
        """Console output of the host (kept after down, for post-mortems)."""
        return self.dir / "logs" / f"{host}.log"

    # ----- state -----------------------------------------------------------

    def _state_path(self) -> Path:
        return self.dir / "state.json"

    def _read_state(self) -> dict[str, Any]:
        """The state file as last written: subnet, suite and hosts (empty when none)."""
        try:
            return dict(json.loads(self._state_path().read_text()))
        except FileNotFoundError:
            return {}

    def _load_state(self) -> dict[str, dict[str, object]]:
        """host -> {address, pid, start_ticks} as last written."""
        return dict(self._read_state().get("hosts", {}))

    def _holder_path(self) -> Path:
        return self.dir / "holder.json"

    def _record_holder(self) -> None:
        """The process whose `with` block the hosts live for (scripts/sandbox's `up` records none: its hosts
        are meant to outlive it)."""
        me = ProcessId.of(os.getpid())
        assert me is not None
        self.dir.mkdir(parents=True, exist_ok=True)
        self._holder_path().write_text(json.dumps({"pid": me.pid, "start_ticks": me.start_ticks}) + "\n")

    def dead_holder(self) -> ProcessId | None:
        """The process that held these hosts in a `with` block and is gone without its teardown (a SIGKILL, the
        machine's end), or None: no holder was recorded, or it still runs."""
        try:
            holder = ProcessId(**json.loads(self._holder_path().read_text()))
        except FileNotFoundError:
            return None
        return None if holder.alive() else holder

    def _save_host(self, host: str, proc: ProcessId | None) -> None:
        """Record a host before its resources exist, so a crash mid-up is cleanable.

        The suite recorded first is kept: an object made with another suite
        (say, only to kill a host) must not change what a replacement boots.
        """
        recorded = self._read_state()
        state = dict(recorded.get("hosts", {}))
        state[host] = {
            "address": self.address(host),
            "pid": proc.pid if proc else None,
            "start_ticks": proc.start_ticks if proc else None,
        }
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self._state_path().with_suffix(".tmp")
        suite = recorded.get("suite", self.suite)
        tmp.write_text(json.dumps({"subnet": self.subnet, "suite": suite, "hosts": state}, indent=2))
        tmp.rename(self._state_path())

    def _known_hosts(self) -> dict[str, str]:
        """Hosts of this object plus those an earlier `up` recorded."""
        recorded = {h: str(v["address"]) for h, v in self._load_state().items()}
        return {**recorded, **self.hosts}

    def _nspawn(self, host: str) -> ProcessId | None:
        """The recorded systemd-nspawn process of a host, if it still runs."""
        entry = self._load_state().get(host)
        if not entry or entry.get("pid") is None:
            return None
        proc = ProcessId(int(str(entry["pid"])), int(str(entry["start_ticks"])))
        return proc if proc.alive() else None

    # ----- lifecycle -------------------------------------------------------

    def up(self) -> None:
        """Create whatever is missing and wait until every host runs sshd and systemd.

        Idempotent: hosts that already run are left alone, missing or dead ones
        are (re)started from their existing disk.
        """
        self._refuse_conflicts()
        started = time.monotonic()
        base = image.ensure_image(self.root, self.suite)
        self.timings["image_s"] = round(time.monotonic() - started, 1)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._ensure_key()
        network.ensure_bridge(self.bridge, self.subnet)
        booting = time.monotonic()
        for host in self.hosts:
            if self._nspawn(host) is None:
                self._start(host, base, wipe=False)
        for host in self.hosts:
            self.wait_running(host, self.boot_timeout)
        self.timings["boot_s"] = round(time.monotonic() - booting, 1)
        self._write_hosts_json()

    def _refuse_conflicts(self) -> None:
        """A running sandbox of the same name must not change subnet, suite or addresses."""
        recorded = self._read_state()
        if not recorded:
            return
        if recorded["subnet"] != self.subnet:
            raise ValueError(f"sandbox {self.name} uses subnet {recorded['subnet']}; run down first")
        if recorded.get("suite", self.suite) != self.suite:
            raise ValueError(f"sandbox {self.name} runs Debian {recorded['suite']}; run down first")
        state = self._load_state()
        for host, address in self.hosts.items():
            if host in state and state[host]["address"] != address:
                raise ValueError(f"{host} has address {state[host]['address']}; run down first")
        network.validate_addresses(self.subnet, self._known_hosts())

    def _ensure_key(self) -> None:
        """One fresh ed25519 key per sandbox, created on first `up`."""
        if self.ssh_key_path.exists():
            return
        keygen(self.ssh_key_path, f"kcp-sandbox-{self.name}")

    def _write_hosts_json(self) -> None:
        """The inventory other tools (and people) read: names, addresses, SSH key, host keys."""
        inventory = {
            "name": self.name,
            "address": self.gateway,
            "subnet": f"{self.subnet}.0/24",
            "suite": self.suite,
            "ssh_key": str(self.ssh_key_path),
            "hosts": [{"name": h, "address": a, "host_key": self.host_key(h)} for h, a in self._known_hosts().items()],
        }
        (self.dir / "hosts.json").write_text(json.dumps(inventory, indent=2) + "\n")

    def down(self) -> None:
        """Kill every host this sandbox started and remove all it created, by name.

        Never fails on pieces that are already gone; keeps the base image and
        the console logs.
        """
        hosts = list(self._known_hosts())
        for host in hosts:
            self._stop(host)
        for host in hosts:
            network.remove_host_link(self.netns(host), self.veth(host))
        network.remove_bridge(self.bridge)
        for host in hosts:
            self._refuse_if_locked(host)
        image.remove_tree(self.dir / "hosts")  # unmounts the disks first
        image.remove_tree(self.dir / "disks")
        for host in hosts:
            self._remove_cgroups(host)
        for leftover in (
            "state.json",
            "state.tmp",
            "holder.json",
            "hosts.json",
            "id_ed25519",
            "id_ed25519.pub",
        ):
            (self.dir / leftover).unlink(missing_ok=True)

    def __enter__(self) -> Self:
        """Bring the sandbox up; if that fails half-way, tear down before raising.

        Until the block ends SIGTERM (a cancelled CI job, `timeout`) raises KeyboardInterrupt: Python's default
        for it ends the process at once, and the hosts would outlive it.
        """
        self._sigterm_restores.append(_sigterm_interrupts())
        try:
            self._record_holder()
            self.up()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Always tear down, whatever happened inside the block."""
        try:
            self.down()
        finally:
            self._sigterm_restores.pop()()

    # ----- one host --------------------------------------------------------

    def start_host(self, host: str, wipe: bool = False) -> None:
        """Boot a stopped host again and wait until it is up.

        wipe=True first recreates its disk from the image of the sandbox's suite:
        a replacement machine with an empty disk (new machine-id and host key,
        same address and release, the sandbox key installed again).
        """
        if self._nspawn(host) is not None:
            raise RuntimeError(f"{host} is running; kill_host() it first")
        self._refuse_conflicts()
        self._start(host, image.ensure_image(self.root, self.suite), wipe=wipe)
        self.wait_running(host, self.boot_timeout)
        self._write_hosts_json()  # a wiped host has a new host key

    def _start(self, host: str, base: Path, wipe: bool) -> None:
        """Network, disk, then systemd-nspawn in the background."""
        self._save_host(host, None)
        network.ensure_host_link(self.netns(host), self.veth(host), self.bridge, self.address(host))
        self._refuse_if_locked(host)
        self._prepare_disk(host, base, wipe)
        self._lock_file(host).unlink(missing_ok=True)
        log_file = self._log_file(host)
        log_file.parent.mkdir(parents=True, exist_ok=True)
        argv = [
            "systemd-nspawn",
            "-D", str(self.host_dir(host)),
            "--boot",
            "--register=no",
            "--keep-unit",
            "--settings=false",
            "--console=read-only",
            f"--network-namespace-path=/run/netns/{self.netns(host)}",
            f"--hostname={host}",
            # Hosts own their network namespace: nftables, keepalived's VIP and HAProxy's
            # transparent bind need CAP_NET_ADMIN there, and it reaches nothing else.
            "--capability=CAP_NET_ADMIN",
        ]  # fmt: skip
        # Its own cgroup first, then exec nspawn (same pid): see _cgroups.
        joins = "".join(f"echo $$ > {shlex.quote(str(group / 'cgroup.procs'))} && " for group in self._cgroups(host))
        with open(log_file, "ab") as out:
            child = subprocess.Popen(
                ["sh", "-c", f'{joins}exec "$@"', "nspawn", *argv],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C in the test must not reach the container
                env={**os.environ, "PATH": SYSTEM_PATH, "TERM": "dumb"},  # TERM: no colours in the log
            )
        self._children[host] = child
        self._save_host(host, ProcessId.of(child.pid))
        log(f"{host}: booting {self.address(host)} (nspawn pid {child.pid})")

    def _prepare_disk(self, host: str, base: Path, wipe: bool) -> None:
        """Mount the host's disk (a new one if asked or none exists), then give it its identity and our key."""
        root, layers = self.host_dir(host), self._disk_layers(host)
        if wipe:
            image.remove_tree(root)
            image.remove_tree(layers)
        if image.mount_disk(base, layers, root):
            (root / "etc/hostname").write_text(f"{host}\n")
            (root / "etc/hosts").write_text(f"127.0.0.1\tlocalhost\n127.0.1.1\t{host}\n::1\tlocalhost ip6-localhost\n")
            (root / "etc/machine-id").write_text(uuid.uuid4().hex + "\n")
            keygen(root / "etc/ssh/ssh_host_ed25519_key", f"root@{host}")
        keys = root / "root/.ssh/authorized_keys"
        keys.parent.mkdir(mode=0o700, exist_ok=True)
        keys.write_text(self.ssh_key_path.with_suffix(".pub").read_text())
        keys.chmod(0o600)

    def container_init(self, host: str) -> int:
        """Host-side pid of the container's init (the nspawn child in a new pid namespace)."""
        nspawn = self._nspawn(host)
        if nspawn is None:
            raise RuntimeError(f"{host} is not running")
        own_ns = os.readlink(f"/proc/{nspawn.pid}/ns/pid")
        for child in children_of(nspawn.pid):
            try:
                if os.readlink(f"/proc/{child}/ns/pid") != own_ns:
                    return child
            except FileNotFoundError:
                continue
        raise RuntimeError(f"{host}: no container init under nspawn pid {nspawn.pid}")

    def kill_host(self, host: str) -> None:
        """Crash a host at once: SIGKILL its init, the whole container dies with it."""
        if self._nspawn(host) is None:
            raise RuntimeError(f"{host} is not running")
        self._stop(host)

    def _stop(self, host: str) -> None:
        """SIGKILL the container (init first, nspawn itself only if it lingers)."""
        nspawn = self._nspawn(host)
        if nspawn is not None:
            # No init yet (nspawn still setting up) is handled just below.
            with contextlib.suppress(RuntimeError, ProcessLookupError):
                os.kill(self.container_init(host), signal.SIGKILL)
            if not wait_until(lambda: not nspawn.alive(), STOP_TIMEOUT):
                log(f"{host}: nspawn {nspawn.pid} still there after init died; SIGKILL")
                os.kill(nspawn.pid, signal.SIGKILL)
                wait_until(lambda: not nspawn.alive(), STOP_TIMEOUT)
        child = self._children.pop(host, None)
        if child is not None:
            child.wait(timeout=STOP_TIMEOUT)  # reap, so no zombie stays behind
        self._lock_file(host).unlink(missing_ok=True)
        if host in self._load_state():
            self._save_host(host, None)

    def _refuse_if_locked(self, host: str) -> None:
        """Never reuse or delete a root filesystem that some live container still locks.

        nspawn holds `.#<dir>.lck` while it runs; a leftover file nobody holds
        is just stale.  Both lock flavours are probed (flock and POSIX/OFD).
        """
        lock = self._lock_file(host)
        try:
            fd = os.open(lock, os.O_RDWR)
        except FileNotFoundError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            raise RuntimeError(f"{lock} is held by a container this sandbox did not start") from err
        finally:
            os.close(fd)

    def is_running(self, host: str) -> bool:
        """True while the host's nspawn process (the one we started) is alive."""
        return self._nspawn(host) is not None

    # ----- faults ----------------------------------------------------------

    def partition(self, host: str) -> None:
        """Cut the host off the network: its veth goes down in the root namespace."""
        network.set_link(self.veth(host), up=False)

    def heal(self, host: str) -> None:
        """Undo partition(): the veth comes back up."""
        network.set_link(self.veth(host), up=True)

    def kill_process(self, host: str, unit: str) -> int:
        """kill -9 the MainPID of a unit inside the host (a crash, not a stop).

        Runs through nsenter, not ssh, so it also works on a partitioned host.
        Returns the pid that was killed, as seen inside the host.
        """
        script = (
            'pid=$(systemctl show -p MainPID --value "$1"); '
            '[ "${pid:-0}" -gt 0 ] || { echo "$1 has no main process" >&2; exit 3; }; '
            'kill -9 "$pid" && echo "$pid"'
        )
        proc = self.exec_in_host(host, ["sh", "-c", script, "sh", unit])
        return int(proc.stdout.decode().strip())

    # ----- commands --------------------------------------------------------

    def ssh_argv(self, host: str, connect_timeout: int = 5, options: Sequence[str] = ()) -> list[str]:
        """The ssh command line for a host (handy for tools that want argv).

        It checks no host key (test inspection), unless `options` (first, so they win) say otherwise.
        """
        return [
            "ssh", *options, "-F", "/dev/null", "-i", str(self.ssh_key_path),
            "-o", "IdentitiesOnly=yes",
            "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null",
            "-o", "BatchMode=yes",
            "-o", f"ConnectTimeout={connect_timeout}",
            "-o", "ServerAliveInterval=5",
            "-o", "ServerAliveCountMax=3",
            "-o", "LogLevel=ERROR",
            f"root@{self.address(host)}",
        ]  # fmt: skip

    def ssh(
        self,
        host: str,
        command: str,
        input: bytes | None = None,
        timeout: float = 60,
        check: bool = True,
        connect_timeout: int = 5,
        options: Sequence[str] = (),
    ) -> subprocess.CompletedProcess[bytes]:
        """Run a shell command on a host as root over ssh; raise SshError if check and it fails."""
        proc = subprocess.run(
            [*self.ssh_argv(host, connect_timeout, options), "--", command],
            input=input,
            stdin=subprocess.DEVNULL if input is None else None,
            capture_output=True,
            timeout=timeout,
            check=False,
        )
        if check and proc.returncode != 0:
            raise SshError(proc.returncode, f"{host}: {command}", proc.stdout, proc.stderr)
        return proc

    def start_unit(self, host: str, unit: str, timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
        """`systemctl start UNIT`, its result returned as it is (a oneshot's start ends with its program)."""
        return self.ssh(host, f"systemctl start {unit}", timeout=timeout, check=False)

    def stop_unit(self, host: str, unit: str, timeout: float = 30) -> None:
        """Stop a long-running UNIT for good (no Restart=), as the loss of its machine would: queue the stop, SIGKILL
        what this host runs of it, and wait until its main process is gone."""
        self.ssh(host, f"systemctl stop --no-block {unit}; systemctl kill -s KILL {unit}", check=False)
        deadline = time.monotonic() + timeout
        main_pid = f"systemctl show -p MainPID --value {unit}"
        while self.ssh(host, main_pid, check=False).stdout.strip() not in (b"0", b""):
            if time.monotonic() > deadline:
                seen = self.ssh(host, f"systemctl list-jobs; systemctl status --no-pager -l {unit}; journalctl -b "
                                      "--no-pager -n 40", check=False).stdout.decode(errors="replace")
                raise AssertionError(f"{host}: {unit} still runs {timeout:.0f} s after it was stopped:\n{seen}")
            time.sleep(0.2)

    def copy_to(self, host: str, local_path: str | Path, remote_path: str) -> None:
        """Copy a file or a directory tree to a host, keeping modes (over ssh, via tar)."""
        local = Path(local_path)
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            tar.add(str(local), arcname="payload")
        remote = shlex.quote(remote_path)
        if local.is_dir():
            command = f"mkdir -p {remote} && tar -x -C {remote} --strip-components=1"
        else:
            command = (
                f'd=$(mktemp -d) && tar -x -C "$d" && mkdir -p "$(dirname {remote})" '
                f'&& mv "$d/payload" {remote} && rmdir "$d"'
            )
        self.ssh(host, command, input=buffer.getvalue())

    def run_in_netns(
        self, host: str, argv: list[str], timeout: float = 30, check: bool = False
    ) -> subprocess.CompletedProcess[bytes]:
        """Run a root-side program inside a host's network namespace (e.g. a TCP probe)."""
        return run(
            ["ip", "netns", "exec", self.netns(host), *argv],
            check=check,
            timeout=timeout,
        )

    def exec_in_host(
        self, host: str, argv: list[str], timeout: float = 30, check: bool = True
    ) -> subprocess.CompletedProcess[bytes]:
        """Run a program inside the container itself without ssh (nsenter into its init)."""
        init = self.container_init(host)
        return run(
            ["nsenter", f"--target={init}", "--mount", "--uts", "--ipc", "--net", "--pid",
             "--root", "--wd", "--", *argv],
            check=check, timeout=timeout,
        )  # fmt: skip

    # ----- waiting ---------------------------------------------------------

    def wait_ssh(self, host: str, timeout: float = 30) -> None:
        """Wait until ssh to the host runs a command; TimeoutError otherwise."""

        def answers() -> bool:
            return self._try_ssh(host, "true") is not None

        if not wait_until(answers, timeout, interval=0.5):
            raise TimeoutError(f"{host} ({self.address(host)}) did not answer ssh in {timeout} s")

    def _try_ssh(self, host: str, command: str) -> str | None:
        """stdout of a quick command, or None when the host does not answer."""
        try:
            proc = self.ssh(host, command, timeout=10, check=False, connect_timeout=2)
        except subprocess.TimeoutExpired:
            return None
        if proc.returncode == 255:
            return None
        return proc.stdout.decode().strip()

    def wait_running(self, host: str, timeout: float = BOOT_TIMEOUT) -> None:
        """Wait until `systemctl is-system-running` says running.

        `degraded` means a unit failed: that is an error of the image, reported
        with the failed units rather than waited out.
        """
        deadline = time.monotonic() + timeout
        state: str | None = None
        for _ in range(int(timeout) * 2 + 1):
            if not self.is_running(host):
                raise RuntimeError(f"{host}: nspawn exited during boot\n{self._log_tail(host)}")
            state = self._try_ssh(host, "systemctl is-system-running")
            if state == "running":
                return
            if state == "degraded":
                failed = self._try_ssh(host, "systemctl --failed --no-legend --plain")
                raise RuntimeError(f"{host} is degraded; failed units:\n{failed}")
            if time.monotonic() >= deadline:
                break
            time.sleep(0.5)
        raise TimeoutError(f"{host} not running after {timeout} s (last state: {state})")

    def _log_tail(self, host: str, lines: int = 30) -> str:
        """The end of the host's console log, for error messages."""
        try:
            return "\n".join(self._log_file(host).read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no console log)"

    def running(self) -> list[str]:
        """Hosts of this sandbox's name whose recorded systemd-nspawn still runs (booted by anyone, any time)."""
        return [host for host in self._load_state() if self._nspawn(host) is not None]

    def status(self) -> list[dict[str, object]]:
        """Each known host with its nspawn pid and whether ssh answers."""
        rows: list[dict[str, object]] = []
        for host, address in self._known_hosts().items():
            nspawn = self._nspawn(host)
            answers = nspawn is not None and self._try_ssh(host, "true") is not None
            rows.append(
                {"name": host, "address": address, "pid": nspawn.pid if nspawn else None,
                 "ssh": answers}
            )  # fmt: skip
        return rows


__all__ = ["LOCAL_STACK_HOSTS", "Sandbox", "SshError"]
