"""ssh to the members and the backup host: one multiplexed connection per host, root through sudo -n."""

from __future__ import annotations

import contextlib
import os
import shlex
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# The snapshot crosses SSH once per member, so the cipher's cost counts. AES-GCM runs on the
# CPU's AES instructions; the others stay as fallbacks for servers without it.
CIPHERS = ("aes128-gcm@openssh.com,aes256-gcm@openssh.com,chacha20-poly1305@openssh.com,"
           "aes128-ctr,aes192-ctr,aes256-ctr")
KNOWN_HOSTS = "known_hosts"  # in the control folder: the stack's pinned host keys
SOCKET_REMOVAL_SECONDS = 2.0  # how long close() waits for an ended master to remove its socket


@dataclass
class Ssh:
    """ssh with one multiplexed connection per host: a restore makes ~6 round trips per member.

    A host whose key the stack pins (`host_keys`: address -> hostKey) is checked against that key only; any
    other host against the operator's own known_hosts. An unknown or changed key is always refused.
    """

    user: str
    key: str | None
    options: Sequence[str] = ()
    host_keys: Mapping[str, str] = field(default_factory=dict)
    _control_dir: str | None = field(default=None, init=False, repr=False)
    _control_dir_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    @property
    def control_dir(self) -> str:
        """A private folder for the multiplexing sockets, made on first use and removed by close().

        The tools reach their hosts from several threads at once; the lock makes them share one folder
        (each used to be able to make its own, and the one overwritten was never removed).
        """
        with self._control_dir_lock:
            if self._control_dir is None:
                folder = tempfile.mkdtemp(prefix="kcp-restore-")
                with open(os.path.join(folder, KNOWN_HOSTS), "w", encoding="utf-8") as known:
                    known.writelines(f"{address} {key}\n" for address, key in self.host_keys.items())
                self._control_dir = folder
            return self._control_dir

    def _host_key_options(self, address: str) -> list[str]:
        """Strict: a pinned host by its key and type only (as pulumi-command checks it), else the operator's file."""
        key = self.host_keys.get(address)
        if key is None:
            return ["-o", "StrictHostKeyChecking=yes"]
        return ["-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={self.control_dir}/{KNOWN_HOSTS}",
                "-o", "GlobalKnownHostsFile=/dev/null", "-o", f"HostKeyAlgorithms={key.split()[0]}"]

    def argv(self, address: str, user: str | None = None) -> list[str]:
        """The ssh command line; host key options come from --ssh-option, else the pinned keys (always strict).

        ssh keeps the first value given for an option, so --ssh-option goes first and wins.
        """
        args = ["ssh"]
        for option in self.options:
            args += ["-o", option]
        args += ["-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "-o", "ServerAliveInterval=10",
                 "-o", f"Ciphers={CIPHERS}", "-o", "ControlMaster=auto", "-o", f"ControlPath={self.control_dir}/%C",
                 "-o", "ControlPersist=120", *self._host_key_options(address)]
        if self.key:
            args += ["-i", self.key, "-o", "IdentitiesOnly=yes"]
        return [*args, f"{user or self.user}@{address}"]

    def remote(self, command: str, user: str | None = None) -> str:
        """The command as root: via sudo -n when the login user is not root."""
        return command if (user or self.user) == "root" else f"sudo -n sh -c {shlex.quote(command)}"

    def command(self, address: str, command: str, user: str | None = None) -> list[str]:
        """ssh's argv that runs `command` as root on `address`."""
        return [*self.argv(address, user), "--", self.remote(command, user)]

    def run(self, address: str, command: str, stdin: Any = None, timeout: float = 300,
            user: str | None = None) -> subprocess.CompletedProcess[bytes]:
        """Run a remote command as root; its output, whatever its exit status."""
        return subprocess.run(self.command(address, command, user),
                              stdin=stdin if stdin is not None else subprocess.DEVNULL,
                              capture_output=True, timeout=timeout, check=False)

    def popen(self, address: str, command: str, stdin: int = subprocess.DEVNULL,
              user: str | None = None) -> subprocess.Popen[bytes]:
        """Start a remote command as root, its stdout and stderr piped back."""
        return subprocess.Popen(self.command(address, command, user), stdin=stdin, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)

    def close(self, addresses: Sequence[str], user: str | None = None) -> None:
        """End the multiplexing masters this run started; their folder goes with the last of them."""
        if self._control_dir is None:
            return
        sockets = len(os.listdir(self._control_dir)) - 1
        for address in addresses:
            ended = subprocess.run([*self.argv(address, user), "-O", "exit"], capture_output=True, timeout=10,
                                   check=False).returncode == 0
            sockets -= ended
        # A master removes its socket just after it answers "exit"; the folder can only go once they are gone.
        deadline = time.monotonic() + SOCKET_REMOVAL_SECONDS
        while len(os.listdir(self._control_dir)) - 1 > sockets and time.monotonic() < deadline:
            time.sleep(0.02)
        with contextlib.suppress(OSError):  # more than known_hosts left: another master still runs
            if os.listdir(self._control_dir) == [KNOWN_HOSTS]:
                os.unlink(os.path.join(self._control_dir, KNOWN_HOSTS))
            os.rmdir(self._control_dir)
            self._control_dir = None
