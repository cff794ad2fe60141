"""etcd-install and kubelet-install: pinned releases onto a host. A download whose sha256 is not the pinned one
(components/versions.py) is refused; a binary that already reports the wanted version is left alone."""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import platform
import re
import shutil
import subprocess
import tarfile
import urllib.request
from pathlib import Path

from kcp_host import systemd
from kcp_host.files import write_atomic
from kcp_host.log import Abort, log

BIN = Path("/usr/local/bin")
ETCD_BINARIES = ("etcd", "etcdctl", "etcdutl")
ETCD_VERSION = r"^etcd Version: (\S+)"
SHA256 = re.compile(r"[0-9a-f]{64}")
ARCH = {"x86_64": "amd64", "aarch64": "arm64"}  # the machine's name -> the releases' name
SBIN = Path("/usr/local/sbin")
# argument -> (binary, its version in `binary --version`, where it goes: the folder for a .tar.gz's files, else the
# binary's path, URL). Their units and configuration are host files (components/render/kubernetes.py).
KUBELET_RELEASES = {
    "kubelet": (BIN / "kubelet", r"^Kubernetes v(\S+)", BIN / "kubelet",
                "https://dl.k8s.io/release/v{v}/bin/linux/{arch}/kubelet"),
    "containerd": (BIN / "containerd", r"^containerd \S+ v(\S+)", BIN, "https://github.com/containerd/containerd/"
                   "releases/download/v{v}/containerd-{v}-linux-{arch}.tar.gz"),
    "runc": (SBIN / "runc", r"^runc version (\S+)", SBIN / "runc",
             "https://github.com/opencontainers/runc/releases/download/v{v}/runc.{arch}"),
    "crictl": (BIN / "crictl", r"^crictl version v(\S+)", BIN, "https://github.com/kubernetes-sigs/cri-tools/"
               "releases/download/v{v}/crictl-v{v}-linux-{arch}.tar.gz"),
}


def version_of(argv: list[str], pattern: str) -> str | None:
    """What a program reports, or None when it is missing or says nothing matching."""
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except OSError:
        return None
    found = re.search(pattern, proc.stdout + proc.stderr, re.MULTILINE)
    return found[1] if found else None


def apt_install(*packages: str) -> None:
    """Never an upgrade: what is installed stays, whatever the package lists say."""
    subprocess.run(["apt-get", "install", "-y", "--no-upgrade", *packages], check=True, capture_output=True,
                   env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})


def install_release(url: str, sha256: str, dest: Path, names: tuple[str, ...] = ()) -> None:
    """Checked in memory before anything is written; base names only, so no path in a release reaches the host."""
    with urllib.request.urlopen(url, timeout=60) as answer:
        data = answer.read()
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise Abort(1, f"checksum mismatch for {url}: refusing to install (got {digest})")
    if not url.endswith(".tar.gz"):
        write_atomic(dest, data, 0o755)
        return
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for member in tar.getmembers():
            name = member.name.rsplit("/", 1)[-1]
            source = tar.extractfile(member) if member.isfile() and (not names or name in names) else None
            if source:
                write_atomic(dest / name, source.read(), 0o755)


def ensure_etcd_user() -> None:
    """The service user that owns the data dir and the member certificates (their folders come with the files)."""
    subprocess.run(["systemd-sysusers", "--inline", 'u etcd - "etcd" /var/lib/etcd /usr/sbin/nologin'], check=True)
    Path("/var/lib/etcd").mkdir(mode=0o700, exist_ok=True)
    shutil.chown("/var/lib/etcd", "etcd", "etcd")


def install_distro_etcd(version: str) -> None:
    """Debian's package (apt verifies it) when it has the wanted version; linked into /usr/local/bin."""
    apt_install("etcd-server", "etcd-client")
    have = version_of(["/usr/bin/etcd", "--version"], ETCD_VERSION)
    if have != version:
        raise Abort(1, f"distribution etcd is {have}, config asks for {version}")
    # The package's own unit must not start a default single-member etcd.
    systemd.systemctl("disable", "--now", "etcd.service")
    for name in ETCD_BINARIES:
        if Path(f"/usr/bin/{name}").exists():
            (BIN / name).unlink(missing_ok=True)
            (BIN / name).symlink_to(f"/usr/bin/{name}")


def etcd(argv: list[str]) -> int:
    """`etcd-install release|distro VERSION SHA256|-`."""
    parser = argparse.ArgumentParser(prog="kcp-host etcd-install", description=(
        "Install a pinned etcd release, or the distribution's etcd, and the etcd service user."))
    parser.add_argument("source", choices=("release", "distro"))
    parser.add_argument("version")
    parser.add_argument("sha256", help="the pinned sha256 of the release archive; - for distro")
    args = parser.parse_args(argv)
    ensure_etcd_user()
    installed = [str(BIN / "etcd"), "--version"]
    if version_of(installed, ETCD_VERSION) == args.version:
        print(f"etcd {args.version} already installed")
        return 0
    if args.source == "distro":
        install_distro_etcd(args.version)
    elif not SHA256.fullmatch(args.sha256):
        raise Abort(2, f"release needs a pinned sha256, got {args.sha256!r}")
    else:
        install_release(f"https://github.com/etcd-io/etcd/releases/download/v{args.version}/etcd-v{args.version}"
                        f"-linux-{ARCH[platform.machine()]}.tar.gz", args.sha256, BIN, ETCD_BINARIES)
    log(f"etcd {version_of(installed, ETCD_VERSION)} installed")
    return 0


def kubelet(argv: list[str]) -> int:
    """`kubelet-install KUBELET KUBELET_SHA256 CONTAINERD CONTAINERD_SHA256 RUNC RUNC_SHA256 CRICTL CRICTL_SHA256`."""
    parser = argparse.ArgumentParser(prog="kcp-host kubelet-install", description=(
        "Install the kubelet, containerd, runc and crictl, each pinned, and start containerd and the kubelet, "
        "whose units and configuration come with the API server's host files."))
    for name in KUBELET_RELEASES:
        parser.add_argument(name, metavar=name.upper())
        parser.add_argument(f"{name}_sha256", metavar=f"{name.upper()}_SHA256")
    args = vars(parser.parse_args(argv))
    unpinned = [f"{name.upper()}_SHA256" for name in KUBELET_RELEASES if not SHA256.fullmatch(args[f"{name}_sha256"])]
    if unpinned:
        raise Abort(2, f"not a sha256: {', '.join(unpinned)}")
    replaced = []
    for name, (binary, pattern, dest, url) in KUBELET_RELEASES.items():
        if version_of([str(binary), "--version"], pattern) != args[name]:
            install_release(url.format(v=args[name], arch=ARCH[platform.machine()]), args[f"{name}_sha256"], dest)
            log(f"{binary.name} {args[name]} installed")
            replaced.append(name)
    systemd.act("daemon-reload")
    # A running daemon keeps its old binary until it restarts (runc and crictl run anew each time). Restarting
    # either leaves the static pods running: containerd's shims hold them, the kubelet adopts them again.
    upgraded = [unit for unit in ("containerd", "kubelet") if unit in replaced]
    if upgraded:
        systemd.act("try-restart", *upgraded)
    systemd.act("enable", "--now", "containerd", "kubelet")
    print(f"kubelet v{args['kubelet']} with containerd v{args['containerd']} running static pods from "
          "/etc/kubernetes/manifests")
    return 0
