"""Stand-ins for the kubelet, its container runtime's CLI and kube-apiserver on the local test hosts, where no kubelet
runs (systemd-nspawn containers): enough for `kcp-host static-pods-restart` to act on, and for a test to see whether
two API servers were ever down at once. Named as stand-ins wherever a test uses them.

  kubelet ADDRESS     runs the "API server" pod while its manifest exists and restarts it when the manifest changes,
                      as a kubelet does; stopping it leaves the pod running (its unit has KillMode=process), as
                      stopping a kubelet leaves its containers to containerd
  crictl [--runtime-endpoint E] pods -q --namespace kube-system | rmp --force ID...
                      the runtime's view of that pod: its ID (the pid), or it removed
  apiserver ADDRESS   the pod: HTTPS on ADDRESS:6443 with the host's API server certificate; /readyz answers 200 one
                      second after the start (a real API server takes seconds), 500 before

Every pod start, ready and stop is appended to /run/kcp-standin/events as `EVENT PID UNIX_TIME`.
"""

from __future__ import annotations

import hashlib
import os
import signal
import ssl
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

MANIFEST = Path("/etc/kubernetes/manifests/kube-apiserver.yaml")
PKI = Path("/etc/kubernetes/pki")
STATE = Path("/run/kcp-standin")
POD, EVENTS = STATE / "pod", STATE / "events"
STARTUP_SECONDS = 1.0


def event(what: str, pid: int) -> None:
    STATE.mkdir(exist_ok=True)
    with EVENTS.open("a") as out:
        out.write(f"{what} {pid} {time.time():.3f}\n")


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def running_pod() -> int | None:
    try:
        pid = int(POD.read_text())
    except (OSError, ValueError):
        return None
    return pid if alive(pid) else None


def remove_pod(pid: int) -> None:
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    if alive(pid):
        os.kill(pid, signal.SIGKILL)


def start_pod(address: str) -> None:
    proc = subprocess.Popen([sys.executable, __file__, "apiserver", address], start_new_session=True,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    POD.write_text(str(proc.pid))


def manifest_digest() -> str | None:
    return hashlib.sha256(MANIFEST.read_bytes()).hexdigest() if MANIFEST.is_file() else None


def kubelet(address: str) -> None:
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # pods it started are reaped at once: no zombie looks alive
    STATE.mkdir(exist_ok=True)
    seen = manifest_digest()
    if seen and running_pod() is None:
        start_pod(address)
    while True:
        time.sleep(0.2)
        now, pid = manifest_digest(), running_pod()
        if now != seen or (now and pid is None):
            if pid is not None:
                remove_pod(pid)
            if now:
                start_pod(address)
            seen = now


def crictl(args: list[str]) -> None:
    while args[:1] == ["--runtime-endpoint"]:
        args = args[2:]
    if args[:1] == ["pods"]:
        pid = running_pod()
        if pid is not None:
            print(pid)
    elif args[:2] == ["rmp", "--force"]:
        for pid in map(int, args[2:]):
            if alive(pid):
                remove_pod(pid)
    else:
        sys.exit(f"crictl stand-in: {' '.join(args)} is not one it knows")


def apiserver(address: str) -> None:
    started, pid = time.monotonic(), os.getpid()
    event("start", pid)

    class Readyz(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            ready = self.path == "/readyz" and time.monotonic() - started >= STARTUP_SECONDS
            self.send_response(200 if ready else 500)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    def stop(signum: int, frame: object) -> None:
        event("stop", pid)
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(PKI / "apiserver.crt", PKI / "apiserver.key")
    deadline = time.monotonic() + 10
    while True:  # the pod it replaces may still hold the port for a moment
        try:
            server = ThreadingHTTPServer((address, 6443), Readyz)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Timer(STARTUP_SECONDS, event, ("ready", pid)).start()
    server.serve_forever()


if __name__ == "__main__":
    role, rest = sys.argv[1], sys.argv[2:]
    if role == "kubelet":
        kubelet(rest[0])
    elif role == "apiserver":
        apiserver(rest[0])
    elif role == "crictl":
        crictl(rest)
    else:
        sys.exit(f"usage: {sys.argv[0]} kubelet|apiserver ADDRESS, or crictl ARGS")
