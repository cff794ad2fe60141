"""The kubelet's static pods (the API server's): restarted from the files they read when those change, then awaited.

A kubelet restarts a static pod as soon as its manifest changes, on every host at once when a change reaches them
all together. So the hosts restart them themselves, one at a time, each waiting until its API server is ready:
`cloud-refresh` on the clouds (under the rollout lock), `static-pods-restart` on bare metal (a step the program
chains host after host).
"""

from __future__ import annotations

import argparse
import hashlib
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path

from kcp_host import systemd
from kcp_host.contract import STATIC_PODS_STARTED
from kcp_host.files import write_atomic
from kcp_host.log import Abort, log

READY_SECONDS = 300  # for /readyz after an API server restart; cloud-refresh's for healthy voters too
API_PORT = 6443
# What the kubelet and its static pods read (components/render/kubernetes.py): a change restarts them.
KUBELET_READS = ("/etc/kubernetes", "/etc/containerd", "/var/lib/kubelet/config.yaml",
                 "/etc/systemd/system/kubelet.service", "/etc/systemd/system/containerd.service")
CRICTL = ("crictl", "--runtime-endpoint", "unix:///run/containerd/containerd.sock")


def kubelet_fingerprint(release: tuple[str, ...]) -> str:
    """What the static pods run on: the kubelet's release and every file the kubelet and they read."""
    digest = hashlib.sha256(repr(release).encode())
    for top in map(Path, KUBELET_READS):
        for path in sorted([top] if top.is_file() else top.rglob("*")):
            if path.is_file():
                digest.update(f"{path}\n".encode() + path.read_bytes())
    return digest.hexdigest()


def crictl(*args: str) -> str:
    proc = subprocess.run([*CRICTL, *args], capture_output=True, text=True, timeout=120, check=False)
    if proc.returncode != 0:
        raise Abort(1, f"crictl {args[0]}: {proc.stderr.strip()[-300:] or f'exit {proc.returncode}'}")
    return proc.stdout


def restart_static_pods() -> None:
    """The pods removed while the kubelet is stopped, so that it creates every one anew from the current manifests
    and files: a pod whose manifest did not change would otherwise go on with the old certificates."""
    systemd.act("stop", "kubelet")
    pods = crictl("pods", "-q", "--namespace", "kube-system").split()
    if pods:
        crictl("rmp", "--force", *pods)
    systemd.act("restart", "containerd")
    systemd.act("start", "kubelet")


def await_readyz(address: str, timeout: float) -> None:
    """This node's API server is ready: /readyz answers anonymous callers, and only its status is read, so the
    serving certificate (which need not name the node) is not checked."""
    url = f"https://{address}:{API_PORT}/readyz"
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context))
    deadline = time.monotonic() + timeout
    while True:
        try:
            with opener.open(url, timeout=5) as answer:
                if answer.status == 200:
                    return
        except OSError:  # not listening yet, or not ready (HTTPError)
            pass
        if time.monotonic() >= deadline:
            raise Abort(1, f"{url} not ready after {timeout:.0f}s")
        time.sleep(2)


def main(argv: list[str]) -> int:
    """`static-pods-restart --address ADDRESS`, bare metal: run after an update of this host's API server files."""
    parser = argparse.ArgumentParser(prog="kcp-host static-pods-restart", description=(
        "Restart this host's static pods from the files they read, when those changed since the pods started, and "
        "wait until its API server is ready. Nothing happens where no kubelet runs."))
    parser.add_argument("--address", required=True, help="the address this host's API server listens on")
    parser.add_argument("--timeout", type=float, default=READY_SECONDS, help="seconds to a ready API server")
    args = parser.parse_args(argv)
    if not systemd.is_active("kubelet"):
        print("no kubelet runs here: the static pods start from these files with it")
        return 0
    started, now = Path(STATIC_PODS_STARTED), kubelet_fingerprint(())
    if started.is_file() and started.read_text().strip() == now:
        print("the static pods' files are the ones they started on: no restart")
        return 0
    # No record (none since boot, or a release before this one): the files may have changed, so restart once.
    log("restarting the static pods: the files they read changed")
    systemd.act("daemon-reload")  # the bundle carries the kubelet's and containerd's units too
    restart_static_pods()
    await_readyz(args.address, args.timeout)
    write_atomic(started, now + "\n")
    print(f"the static pods restarted; the API server on {args.address} is ready")
    return 0
