"""etcd-install and kubelet-install: put pinned releases on a host, refusing any download whose
sha256 is not the pinned one (components/versions.py). Idempotent: a binary of the right
version is left alone."""

from __future__ import annotations

import argparse
import grp
import hashlib
import os
import platform
import pwd
import re
import shutil
import subprocess
import tarfile
import tempfile
import urllib.request
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from kcp_host import systemd
from kcp_host.files import write_atomic
from kcp_host.log import Abort, log

BIN = Path("/usr/local/bin")
ETCD_BINARIES = ("etcd", "etcdctl", "etcdutl")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def arch() -> str:
    machine = platform.machine()
    names = {"x86_64": "amd64", "aarch64": "arm64"}
    if machine not in names:
        raise Abort(1, f"unsupported architecture {machine}")
    return names[machine]


def download(url: str, sha256: str, dest: Path) -> None:
    """Fetch `url` to `dest`; Abort unless its sha256 is the pinned one."""
    digest = hashlib.sha256()
    with urllib.request.urlopen(url, timeout=60) as answer, dest.open("wb") as out:
        while chunk := answer.read(1 << 20):
            digest.update(chunk)
            out.write(chunk)
    if digest.hexdigest() != sha256:
        raise Abort(1, f"checksum mismatch for {url}: refusing to install (got {digest.hexdigest()})")


def version_of(argv: list[str], pattern: str) -> str | None:
    """The version a binary reports, or None when it is missing or says nothing matching."""
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except OSError:
        return None
    found = re.search(pattern, proc.stdout + proc.stderr, re.MULTILINE)
    return found[1] if found else None


def installed_etcd() -> str | None:
    return version_of([str(BIN / "etcd"), "--version"], r"^etcd Version: (\S+)")


def apt_install(*packages: str) -> None:
    subprocess.run(["apt-get", "install", "-y", *packages], check=True,
                   env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"}, capture_output=True)


def install_binary(source: IO[bytes], target: Path) -> None:
    """Replace `target` by a new file: a running binary keeps its old one."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as out:
        shutil.copyfileobj(source, out)
    os.chmod(out.name, 0o755)
    os.replace(out.name, target)


def install_from_tar(archive: Path, dest: Path, names: Collection[str] = ()) -> None:
    """The archive's regular files (those in `names`, if given) into `dest` under their base names: a
    release's folder layout, and any path in it, never reaches the host."""
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            name = member.name.rsplit("/", 1)[-1]
            if member.isfile() and (not names or name in names):
                source = tar.extractfile(member)
                assert source is not None
                install_binary(source, dest / name)


def ensure_etcd_user() -> None:
    """The service user that owns the data dir and the member certificates."""
    try:
        grp.getgrnam("etcd")
    except KeyError:
        subprocess.run(["groupadd", "--system", "etcd"], check=True)
    try:
        pwd.getpwnam("etcd")
    except KeyError:
        subprocess.run(["useradd", "--system", "--gid", "etcd", "--home-dir", "/var/lib/etcd",
                        "--shell", "/usr/sbin/nologin", "etcd"], check=True)
    Path("/var/lib/etcd").mkdir(mode=0o700, exist_ok=True)
    shutil.chown("/var/lib/etcd", "etcd", "etcd")
    Path("/etc/etcd/pki").mkdir(mode=0o755, parents=True, exist_ok=True)


def install_distro_etcd(version: str) -> None:
    """Debian's package (apt verifies it) when it has the wanted version; linked into /usr/local/bin."""
    if version_of(["dpkg-query", "-W", "-f=${Status}", "etcd-server"], r"(install ok installed)") is None:
        apt_install("etcd-server", "etcd-client")
    have = version_of(["/usr/bin/etcd", "--version"], r"^etcd Version: (\S+)")
    if have != version:
        raise Abort(1, f"distribution etcd is {have}, config asks for {version}")
    # The package's own unit must not start a default single-member etcd.
    subprocess.run(["systemctl", "disable", "--now", "etcd.service"], capture_output=True, check=False)
    for name in ETCD_BINARIES:
        if Path(f"/usr/bin/{name}").exists():
            link = BIN / name
            link.unlink(missing_ok=True)
            link.symlink_to(f"/usr/bin/{name}")


def install_release_etcd(version: str, sha256: str) -> None:
    url = f"https://github.com/etcd-io/etcd/releases/download/v{version}/etcd-v{version}-linux-{arch()}.tar.gz"
    with tempfile.TemporaryDirectory() as work:
        archive = Path(work) / "etcd.tar.gz"
        download(url, sha256, archive)
        install_from_tar(archive, BIN, ETCD_BINARIES)


def etcd(argv: list[str]) -> int:
    """`etcd-install release|distro VERSION SHA256|-`."""
    parser = argparse.ArgumentParser(prog="kcp-host etcd-install", description=__doc__.splitlines()[0])
    parser.add_argument("source", choices=("release", "distro"))
    parser.add_argument("version")
    parser.add_argument("sha256", help="the pinned sha256 of the release archive; - for distro")
    args = parser.parse_args(argv)
    ensure_etcd_user()
    if installed_etcd() == args.version:
        print(f"etcd {args.version} already installed")
        return 0
    if args.source == "distro":
        install_distro_etcd(args.version)
    elif not _SHA256.match(args.sha256):
        raise Abort(2, f"release needs a pinned sha256, got {args.sha256!r}")
    else:
        install_release_etcd(args.version, args.sha256)
    log(f"etcd {installed_etcd()} installed")
    return 0


SBIN = Path("/usr/local/sbin")
MANIFESTS = "/etc/kubernetes/manifests"
KUBELET_ARGS = ("k8s", "kubelet_sha256", "containerd", "containerd_sha256", "runc", "runc_sha256",
                "crictl", "crictl_sha256")
CONTAINERD_UNIT = """\
[Unit]
Description=containerd container runtime
After=network.target
[Service]
ExecStartPre=-/sbin/modprobe overlay
ExecStart=/usr/local/bin/containerd
Restart=always
Delegate=yes
KillMode=process
LimitNOFILE=infinity
[Install]
WantedBy=multi-user.target
"""
KUBELET_CONFIG = f"""\
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
staticPodPath: {MANIFESTS}
cgroupDriver: systemd
containerRuntimeEndpoint: unix:///run/containerd/containerd.sock
authentication:
  anonymous: {{enabled: false}}
  webhook: {{enabled: false}}
authorization: {{mode: AlwaysAllow}}
readOnlyPort: 0
address: 127.0.0.1
protectKernelDefaults: false
"""
KUBELET_UNIT = """\
[Unit]
Description=kubelet (standalone: control-plane static pods)
After=containerd.service
Requires=containerd.service
[Service]
ExecStart=/usr/local/bin/kubelet --config=/var/lib/kubelet/config.yaml
Restart=always
RestartSec=5
[Install]
WantedBy=multi-user.target
"""


@dataclass(frozen=True)
class Release:
    """One pinned download, skipped while `binary --version` reports `version`: a .tar.gz whose files go
    into the folder `dest`, or a bare binary installed as `dest`."""

    binary: Path
    pattern: str  # finds the version in `binary --version`
    version: str
    url: str
    sha256: str
    dest: Path

    def ensure(self, work: Path) -> None:
        if version_of([str(self.binary), "--version"], self.pattern) == self.version:
            return
        fetched = work / self.url.rsplit("/", 1)[-1]
        download(self.url, self.sha256, fetched)
        if fetched.name.endswith(".tar.gz"):
            install_from_tar(fetched, self.dest)
        else:
            with fetched.open("rb") as source:
                install_binary(source, self.dest)
        log(f"{self.binary.name} {self.version} installed")


def kubelet_releases(a: argparse.Namespace, cpu: str) -> list[Release]:
    gh = "https://github.com"
    return [
        Release(BIN / "containerd", r"^containerd \S+ v(\S+)", a.containerd, f"{gh}/containerd/containerd/releases/"
                f"download/v{a.containerd}/containerd-{a.containerd}-linux-{cpu}.tar.gz", a.containerd_sha256, BIN),
        Release(SBIN / "runc", r"^runc version (\S+)", a.runc,
                f"{gh}/opencontainers/runc/releases/download/v{a.runc}/runc.{cpu}", a.runc_sha256, SBIN / "runc"),
        Release(BIN / "crictl", r"^crictl version v(\S+)", a.crictl, f"{gh}/kubernetes-sigs/cri-tools/releases/"
                f"download/v{a.crictl}/crictl-v{a.crictl}-linux-{cpu}.tar.gz", a.crictl_sha256, BIN),
        Release(BIN / "kubelet", r"^Kubernetes v(\S+)", a.k8s,
                f"https://dl.k8s.io/release/v{a.k8s}/bin/linux/{cpu}/kubelet", a.kubelet_sha256, BIN / "kubelet"),
    ]


def configure_kubelet() -> None:
    """containerd with systemd cgroups, and the kubelet standalone: it needs no API server to (re)start
    kube-apiserver's static pod, so a control-plane host heals itself after a crash."""
    for folder in ("/etc/containerd", "/var/lib/kubelet", MANIFESTS):
        Path(folder).mkdir(mode=0o755, parents=True, exist_ok=True)
    config = Path("/etc/containerd/config.toml")
    text = config.read_text() if config.exists() else subprocess.run(
        [str(BIN / "containerd"), "config", "default"], capture_output=True, text=True, check=True).stdout
    write_atomic(config, text.replace("SystemdCgroup = false", "SystemdCgroup = true"))
    write_atomic("/etc/systemd/system/containerd.service", CONTAINERD_UNIT)
    write_atomic("/var/lib/kubelet/config.yaml", KUBELET_CONFIG)
    write_atomic("/etc/systemd/system/kubelet.service", KUBELET_UNIT)
    systemd.systemctl("daemon-reload", check=True)
    systemd.systemctl("enable", "--now", "containerd", "kubelet", check=True)


def kubelet(argv: list[str]) -> int:
    """`kubelet-install K8S KUBELET_SHA256 CONTAINERD CONTAINERD_SHA256 RUNC RUNC_SHA256 CRICTL CRICTL_SHA256`."""
    parser = argparse.ArgumentParser(prog="kcp-host kubelet-install", description=(
        "Install containerd, runc, crictl and the kubelet, each pinned, and run the kubelet standalone for the "
        "control plane's static pods."))
    for name in KUBELET_ARGS:
        parser.add_argument(name, metavar=name.upper())
    args = parser.parse_args(argv)
    unpinned = [n.upper() for n in KUBELET_ARGS if n.endswith("sha256") and not _SHA256.match(getattr(args, n))]
    if unpinned:
        raise Abort(2, f"not a sha256: {', '.join(unpinned)}")
    with tempfile.TemporaryDirectory() as work:
        for release in kubelet_releases(args, arch()):
            release.ensure(Path(work))
    configure_kubelet()
    print(f"kubelet v{args.k8s} with containerd v{args.containerd} running static pods from {MANIFESTS}")
    return 0
