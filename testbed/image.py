"""The base root filesystems below every sandbox host's disk, one per Debian suite.

Hosts run Debian trixie by default: its etcd 3.5 (with `etcdutl`) is the minor
version the deployment's default `etcd.version` installs.  Bookworm stays
available for tests that need Debian's etcd 3.4, whose `etcdctl` still does
`snapshot status|restore` itself.

Each suite's image is built once with debootstrap (a minute or two) and cached
under /var/lib/kcp-sandbox/image-<suite>.  A stamp file inside the image holds a
hash of its recipe (this file, the suite, the package and unit lists and the
mirror), so editing the recipe rebuilds it and nothing else does.  The build
happens in a temporary directory that is renamed into place at the very end: an
interrupted build never leaves a half image behind.  Each suite has its own
lock, so building one never waits for the other.
"""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
import time
from pathlib import Path

from testbed.system import held_alone, log, run

STATE_ROOT = Path("/var/lib/kcp-sandbox")
STAMP_NAME = ".kcp-image-stamp"

#: How long a caller waits for another's build of the same image (45 s here, minutes on a slow mirror) before it
#: fails naming the builder's pid.
BUILD_PATIENCE = 20 * 60

#: The Debian suites hosts can run; the first is the default.
SUITES = ("trixie", "bookworm")
DEFAULT_SUITE = SUITES[0]

#: What debootstrap installs: enough for a host that boots systemd and runs sshd.
BOOTSTRAP_INCLUDE = ("systemd", "systemd-sysv", "dbus", "openssh-server", "iproute2")

#: What the deployment and the tests need on a host.  The full python3 runs
#: the host agent, a standard-library program, and the stand-in HTTPS API
#: server: python3-minimal alone lacks json, concurrent.futures, urllib and
#: tarfile.  openssh-sftp-server lets scp/sftp copy files.
PACKAGES = (
    "etcd-server",
    "etcd-client",
    "haproxy",
    "keepalived",
    "nftables",
    "python3",
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

#: Units masked in the image of every suite (checked by booting each image:
#: with these masked, `systemctl is-system-running` reports `running`; nothing
#: had failed before, they are masked so that hosts stay quiet and deterministic
#: during tests):
#: - console-getty, getty@, container-getty@: hosts are reached over ssh only;
#:   nspawn's console is read-only here (stdin is not a terminal).
#: - apt-daily*, dpkg-db-backup, fstrim: periodic jobs that would fire at
#:   random times; apt's would try to reach a mirror that hosts have no route
#:   to, fail, and turn the system `degraded` in the middle of a test.
#: Booted, trixie starts no other periodic or failing unit than bookworm: both
#: keep systemd-tmpfiles-clean.timer (it only cleans /tmp).  Trixie's systemd
#: also listens for ssh on a local AF_UNIX socket (sshd-unix-local.socket, made
#: by systemd-ssh-generator); it reaches nothing outside the host and stays.
MASKED_UNITS = (
    "console-getty.service",
    "getty@.service",
    "container-getty@.service",
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "dpkg-db-backup.timer",
    "fstrim.timer",
)

#: Periodic units masked only where they exist: e2fsprogs, which brings the
#: e2scrub_* jobs, is in bookworm's minbase but no longer in trixie's.  Masking
#: a missing unit leaves a link to nothing and disabling one fails on trixie,
#: so every unit listed for a suite must exist in it (checked at build time).
SUITE_MASKED_UNITS: dict[str, tuple[str, ...]] = {
    "bookworm": ("e2scrub_all.timer", "e2scrub_reap.service"),
    "trixie": (),
}

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


def masked_units(suite: str) -> tuple[str, ...]:
    """Every unit masked in the suite's image."""
    return MASKED_UNITS + SUITE_MASKED_UNITS[suite]


def check_suite(suite: str) -> None:
    """Refuse a suite early: debootstrap would only fail minutes into a build."""
    if suite not in SUITES:
        raise ValueError(f"suite {suite!r} is not one of {', '.join(SUITES)}")


def image_dir(root: Path = STATE_ROOT, suite: str = DEFAULT_SUITE) -> Path:
    """Where the finished image of a suite lives."""
    check_suite(suite)
    return root / f"image-{suite}"


def debian_mirror(suite: str, apt_dir: Path = Path("/etc/apt")) -> str:
    """The Debian mirror that apt on this machine already uses.

    Read, never hard-coded: the project must not name a mirror host, and the
    machine's own mirror is the one its network is known to reach.  A suite the
    machine does not list (trixie on a bookworm machine) comes from the archive
    of one it does: one Debian archive serves every release.
    """
    sources = _apt_sources(apt_dir)
    for wanted in (suite, *SUITES):
        for uri, suites in sources:
            if wanted in suites:
                return uri
    raise RuntimeError(f"no Debian {' or '.join(SUITES)} mirror found in {apt_dir}")


def _apt_sources(apt_dir: Path) -> list[tuple[str, list[str]]]:
    """(URI, suites) of every `deb` source, deb822 files first, in file order."""
    sources: list[tuple[str, list[str]]] = []
    for path in sorted((apt_dir / "sources.list.d").glob("*.sources")):
        for stanza in re.split(r"\n\s*\n", path.read_text()):
            fields = _deb822_fields(stanza)
            if "deb" in fields.get("types", "").split() and "uris" in fields:
                sources.append((fields["uris"].split()[0], fields.get("suites", "").split()))
    list_file = apt_dir / "sources.list"
    if list_file.exists():
        for line in list_file.read_text().splitlines():
            match = re.match(r"\s*deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(\S+)", line)
            if match:
                sources.append((match.group(1), [match.group(2)]))
    return sources


def _deb822_fields(stanza: str) -> dict[str, str]:
    """Lower-cased field names of one deb822 stanza (comments dropped)."""
    fields: dict[str, str] = {}
    for line in stanza.splitlines():
        if line.startswith("#") or ":" not in line or line[:1].isspace():
            continue
        key, value = line.split(":", 1)
        fields[key.strip().lower()] = value.strip()
    return fields


def recipe_stamp(suite: str, mirror: str) -> str:
    """Hash of everything that decides the image's content."""
    recipe = json.dumps(
        [
            suite,
            BOOTSTRAP_INCLUDE,
            PACKAGES,
            DISABLED_UNITS,
            masked_units(suite),
            SSHD_CONFIG,
            mirror,
        ]
    )
    digest = hashlib.sha256(recipe.encode())
    digest.update(Path(__file__).read_bytes())
    return digest.hexdigest()


def ensure_image(root: Path = STATE_ROOT, suite: str = DEFAULT_SUITE) -> Path:
    """Return the suite's cached image, building it first when missing or outdated.

    A lock file per suite serialises concurrent callers (two test sessions, or
    the CLI and a test), so only one of them builds.
    """
    target = image_dir(root, suite)
    root.mkdir(parents=True, exist_ok=True)
    mirror = debian_mirror(suite)
    stamp = recipe_stamp(suite, mirror)
    with held_alone(root / f".{target.name}.lock", patience=BUILD_PATIENCE):
        stamp_file = target / STAMP_NAME
        if stamp_file.exists() and stamp_file.read_text().strip() == stamp:
            return target
        _remove_stale_builds(target)
        started = time.monotonic()
        build = Path(tempfile.mkdtemp(prefix=f"{target.name}.build-", dir=root))
        try:
            _build(build, suite, mirror)
        except BaseException:
            remove_tree(build)
            raise
        (build / STAMP_NAME).write_text(stamp + "\n")
        _swap_into_place(build, target)
        log(f"{suite} image built in {time.monotonic() - started:.0f} s: {target}")
    return target


def _build(build: Path, suite: str, mirror: str) -> None:
    """debootstrap, install the packages, then configure the image."""
    log(f"building {suite} base image in {build} from {mirror} (takes a few minutes)")
    build.chmod(0o755)
    run(
        [
            "debootstrap",
            "--variant=minbase",
            f"--include={','.join(BOOTSTRAP_INCLUDE)}",
            suite,
            str(build),
            mirror,
        ],
        timeout=1800,
    )
    _install_packages(build, suite)
    _configure(build)


def _install_packages(build: Path, suite: str) -> None:
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
        _require_units(build, suite, (*DISABLED_UNITS, *masked_units(suite)))
        run([*chroot, "systemctl", "disable", *DISABLED_UNITS], env=CHROOT_ENV)
        run([*chroot, "systemctl", "mask", *masked_units(suite)], env=CHROOT_ENV)
    finally:
        run(["umount", "--lazy", str(proc)], check=False)
    policy.unlink()


def _require_units(build: Path, suite: str, units: tuple[str, ...]) -> None:
    """Fail the build on a unit the suite lacks: its mask or disable would do nothing."""
    missing = [unit for unit in units if not (build / "usr/lib/systemd/system" / unit).exists()]
    if missing:
        raise RuntimeError(f"{suite} has no unit {', '.join(missing)}: update the unit lists in {__file__}")


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
    old = target.with_name(f"{target.name}.old-{build.name}")
    if target.exists():
        target.rename(old)
    build.rename(target)
    if old.exists():
        remove_tree(old)


def _remove_stale_builds(target: Path) -> None:
    """Delete what interrupted builds of this image left (only called while holding its lock)."""
    for stale in [*target.parent.glob(f"{target.name}.build-*"), *target.parent.glob(f"{target.name}.old-*")]:
        log(f"removing interrupted image build {stale}")
        remove_tree(stale)


def unmount_under(path: Path) -> None:
    """Unmount everything mounted at or below path, deepest first."""
    top = str(path.resolve())
    mounts = []
    for line in Path("/proc/mounts").read_text().splitlines():
        mount_point = line.split()[1].replace("\\040", " ")
        if mount_point == top or mount_point.startswith(top + "/"):
            mounts.append(mount_point)
    for mount_point in sorted(mounts, key=len, reverse=True):
        run(["umount", "--lazy", mount_point], check=False)


def remove_tree(path: Path) -> None:
    """rm -rf that never crosses into a mount (a leftover /proc, say)."""
    if not path.exists() and not path.is_symlink():
        return
    unmount_under(path)
    run(["rm", "-rf", "--one-file-system", str(path)], timeout=600)


def mount_disk(image: Path, layers: Path, dest: Path) -> bool:
    """A host's own disk at dest: the image read-only below, the host's writes in layers/upper (overlayfs).

    Copying the image took 6-11 s a host here (cp -a of ~360 MB); an overlay mounts at once. Returns True when
    the disk is new (no writes of an earlier boot). The image must not change while disks use it: ensure_image
    rebuilds it only when its recipe changed.
    """
    fresh = not (layers / "upper").is_dir()
    for layer in ("upper", "work"):
        (layers / layer).mkdir(parents=True, exist_ok=True)
    dest.mkdir(parents=True, exist_ok=True)
    if not dest.is_mount():
        run(["mount", "-t", "overlay", "overlay", "-o",
             f"lowerdir={image},upperdir={layers / 'upper'},workdir={layers / 'work'}", str(dest)])
    return fresh
