"""The base root filesystem that every sandbox host is copied from.

Built once with debootstrap (about a minute or two) and cached under
/var/lib/kcp-sandbox/image.  A stamp file inside the image holds a hash of the
recipe (this file, the package lists and the mirror), so editing the recipe
rebuilds it and nothing else does.  The build happens in a temporary directory
that is renamed into place at the very end: an interrupted build never leaves a
half image behind.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import re
import tempfile
import time
from pathlib import Path

from testbed.system import log, run

STATE_ROOT = Path("/var/lib/kcp-sandbox")
STAMP_NAME = ".kcp-image-stamp"
SUITE = "bookworm"

#: What debootstrap installs: enough for a host that boots systemd and runs sshd.
BOOTSTRAP_INCLUDE = ("systemd", "systemd-sysv", "dbus", "openssh-server", "iproute2")

#: What the deployment and the tests need on a host.  python3-minimal runs the
#: stand-in HTTPS API server; openssh-sftp-server lets scp/sftp copy files.
PACKAGES = (
    "etcd-server",
    "etcd-client",
    "haproxy",
    "keepalived",
    "nftables",
    "python3-minimal",
    "curl",
    "ca-certificates",
    "procps",
    "openssl",
    "iputils-ping",
    "openssh-sftp-server",
)

#: Installed but stopped: nothing runs on a host until the deployment enables it.
DISABLED_UNITS = (
    "etcd.service",
    "haproxy.service",
    "keepalived.service",
    "nftables.service",
)

#: Units masked in the image (checked by booting it: with these masked,
#: `systemctl is-system-running` reports `running`; nothing had failed before,
#: they are masked so that hosts stay quiet and deterministic during tests):
#: - console-getty, getty@, container-getty@: hosts are reached over ssh only;
#:   nspawn's console is read-only here (stdin is not a terminal).
#: - apt-daily*, dpkg-db-backup, e2scrub_*, fstrim: periodic jobs that would
#:   fire at random times; apt's would try to reach a mirror that hosts have no
#:   route to, fail, and turn the system `degraded` in the middle of a test.
MASKED_UNITS = (
    "console-getty.service",
    "getty@.service",
    "container-getty@.service",
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "dpkg-db-backup.timer",
    "e2scrub_all.timer",
    "e2scrub_reap.service",
    "fstrim.timer",
)

SSHD_CONFIG = """\
# kcp sandbox host: root by key only, one host key generated per host.
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
HostKey /etc/ssh/ssh_host_ed25519_key
UseDNS no
"""

CHROOT_ENV = {
    "DEBIAN_FRONTEND": "noninteractive",
    "LC_ALL": "C",
    "HOME": "/root",
}


def image_dir(root: Path = STATE_ROOT) -> Path:
    """Where the finished image lives."""
    return root / "image"


def debian_mirror(apt_dir: Path = Path("/etc/apt")) -> str:
    """The Debian mirror that apt on this machine already uses.

    Read, never hard-coded: the project must not name a mirror host, and the
    machine's own mirror is the one its network is known to reach.
    """
    for sources in sorted((apt_dir / "sources.list.d").glob("*.sources")):
        for stanza in re.split(r"\n\s*\n", sources.read_text()):
            fields = _deb822_fields(stanza)
            if "deb" in fields.get("types", "").split() and SUITE in fields.get("suites", "").split():
                return fields["uris"].split()[0]
    list_file = apt_dir / "sources.list"
    if list_file.exists():
        for line in list_file.read_text().splitlines():
            match = re.match(r"\s*deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(\S+)", line)
            if match and match.group(2) == SUITE:
                return match.group(1)
    raise RuntimeError(f"no Debian {SUITE} mirror found in {apt_dir}")


def _deb822_fields(stanza: str) -> dict[str, str]:
    """Lower-cased field names of one deb822 stanza (comments dropped)."""
    fields: dict[str, str] = {}
    for line in stanza.splitlines():
        if line.startswith("#") or ":" not in line or line[:1].isspace():
            continue
        key, value = line.split(":", 1)
        fields[key.strip().lower()] = value.strip()
    return fields


def recipe_stamp(mirror: str) -> str:
    """Hash of everything that decides the image's content."""
    recipe = json.dumps(
        [
            SUITE,
            BOOTSTRAP_INCLUDE,
            PACKAGES,
            DISABLED_UNITS,
            MASKED_UNITS,
            SSHD_CONFIG,
            mirror,
        ]
    )
    digest = hashlib.sha256(recipe.encode())
    digest.update(Path(__file__).read_bytes())
    return digest.hexdigest()


def ensure_image(root: Path = STATE_ROOT) -> Path:
    """Return the cached image, building it first when missing or outdated.

    A lock file serialises concurrent callers (two test sessions, or the CLI
    and a test), so only one of them builds.
    """
    root.mkdir(parents=True, exist_ok=True)
    mirror = debian_mirror()
    stamp = recipe_stamp(mirror)
    target = image_dir(root)
    with open(root / ".image.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        stamp_file = target / STAMP_NAME
        if stamp_file.exists() and stamp_file.read_text().strip() == stamp:
            return target
        _remove_stale_builds(root)
        started = time.monotonic()
        build = Path(tempfile.mkdtemp(prefix="image.build-", dir=root))
        try:
            _build(build, mirror)
        except BaseException:
            remove_tree(build)
            raise
        (build / STAMP_NAME).write_text(stamp + "\n")
        _swap_into_place(build, target)
        log(f"image built in {time.monotonic() - started:.0f} s: {target}")
    return target


def _build(build: Path, mirror: str) -> None:
    """debootstrap, install the packages, then configure the image."""
    log(f"building base image in {build} from {mirror} (takes a few minutes)")
    build.chmod(0o755)
    run(
        [
            "debootstrap",
            "--variant=minbase",
            f"--include={','.join(BOOTSTRAP_INCLUDE)}",
            SUITE,
            str(build),
            mirror,
        ],
        timeout=1800,
    )
    _install_packages(build)
    _configure(build)


def _install_packages(build: Path) -> None:
    """apt-get install inside the chroot, with services kept from starting."""
    policy = build / "usr/sbin/policy-rc.d"
    policy.write_text("#!/bin/sh\n# no service starts inside the image build\nexit 101\n")
    policy.chmod(0o755)
    proc = build / "proc"
    run(["mount", "-t", "proc", "proc", str(proc)])
    try:
        chroot = ["chroot", str(build)]
        run([*chroot, "apt-get", "update"], env=CHROOT_ENV, timeout=600)
        run(
            [*chroot, "apt-get", "install", "-y", "--no-install-recommends", *PACKAGES],
            env=CHROOT_ENV,
            timeout=1800,
        )
        run([*chroot, "apt-get", "clean"], env=CHROOT_ENV)
        run([*chroot, "systemctl", "disable", *DISABLED_UNITS], env=CHROOT_ENV)
        run([*chroot, "systemctl", "mask", *MASKED_UNITS], env=CHROOT_ENV)
    finally:
        run(["umount", "--lazy", str(proc)], check=False)
    policy.unlink()


def _configure(build: Path) -> None:
    """Settings shared by every host; per-host identity is written at host creation."""
    for key in (build / "etc/ssh").glob("ssh_host_*"):
        key.unlink()
    (build / "etc/ssh/sshd_config.d/kcp-sandbox.conf").write_text(SSHD_CONFIG)
    root_ssh = build / "root/.ssh"
    root_ssh.mkdir(mode=0o700, exist_ok=True)
    # Empty machine-id: each host copy gets its own at creation.
    (build / "etc/machine-id").write_text("")
    # debootstrap copied this machine's resolver; hosts have no DNS (and no
    # route to one): everything in the sandbox is addressed by IP.
    (build / "etc/resolv.conf").unlink(missing_ok=True)
    (build / "etc/resolv.conf").write_text("# no DNS in the kcp sandbox\n")
    for lists in (build / "var/lib/apt/lists").glob("*_*"):
        lists.unlink()


def _swap_into_place(build: Path, target: Path) -> None:
    """Replace the old image by the new one with renames only."""
    old = target.with_name(f"image.old-{build.name}")
    if target.exists():
        target.rename(old)
    build.rename(target)
    if old.exists():
        remove_tree(old)


def _remove_stale_builds(root: Path) -> None:
    """Delete what interrupted builds left (only called while holding the lock)."""
    for stale in [*root.glob("image.build-*"), *root.glob("image.old-*")]:
        log(f"removing interrupted image build {stale}")
        remove_tree(stale)


def unmount_under(path: Path) -> None:
    """Unmount everything mounted below path, deepest first."""
    prefix = str(path.resolve()) + "/"
    mounts = []
    for line in Path("/proc/mounts").read_text().splitlines():
        mount_point = line.split()[1].replace("\\040", " ")
        if mount_point.startswith(prefix):
            mounts.append(mount_point)
    for mount_point in sorted(mounts, key=len, reverse=True):
        run(["umount", "--lazy", mount_point], check=False)


def remove_tree(path: Path) -> None:
    """rm -rf that never crosses into a mount (a leftover /proc, say)."""
    if not path.exists() and not path.is_symlink():
        return
    unmount_under(path)
    run(["rm", "-rf", "--one-file-system", str(path)], timeout=600)


def copy_image(image: Path, dest: Path) -> None:
    """A host's own full copy of the image (cp -a keeps owners, modes, links)."""
    remove_tree(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.copy")
    remove_tree(tmp)
    run(["cp", "-a", "--", str(image), str(tmp)], timeout=600)
    (tmp / STAMP_NAME).unlink(missing_ok=True)
    tmp.rename(dest)
