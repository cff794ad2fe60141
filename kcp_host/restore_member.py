"""etcd-restore-member: the steps that must happen on each etcd host to rebuild the cluster from one snapshot.

The operator side (scripts/etcd-restore, components/restore/) runs each step on every member in
parallel and only moves to the next step when all members succeeded. `prepare` does the slow
work beside the live data and changes nothing, so a snapshot refused by any member leaves every
member untouched. Old data is moved aside with a timestamp, never deleted.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from io import BufferedReader
from pathlib import Path
from urllib.parse import urlsplit

from kcp_host import systemd
from kcp_host.contract import ClusterEnv, load_env
from kcp_host.etcd import Etcdctl, EtcdError, command_env, last_line, snapshot_tool
from kcp_host.files import chown_tree, utc_stamp, write_atomic
from kcp_host.log import Abort, log, set_program

USAGE = """steps:
  prepare --token T              one session with the operator: print "quorum healthy" or "quorum none"
                                 (what this member sees), then read "snapshot NAME BYTES" (or "abort"),
                                 exactly BYTES of snapshot, and the operator's verdict line: "ok" (it
                                 hashed the stream against the recorded sha256) or "refused REASON".
                                 Only after "ok": restore it beside the live data dir as this member of
                                 the configured initial cluster with the new cluster token T; prints
                                 "prepared <bytes> <receive s> <restore s>". Changes nothing live.
  stop-apiserver                 park the kube-apiserver static pod manifest, stop kube-apiserver* units
  switch --token T               kill etcd, move the data dir aside (timestamped), put the prepared one
                                 in its place and mark it restored (KCP_RESTORED_FILE); etcd stays down
  start-etcd                     start etcd; return once its process runs (not waiting for a quorum);
                                 a start that fails before etcd runs is retried at once, twice
  wait-healthy --revision R [--timeout S]
                                 wait until every configured member is healthy at revision >= R and all
                                 agree on hashkv at R; prints "hashkv <hash>"
  start-apiserver                put the manifest back, start the kube-apiserver* units that were stopped
Reads /etc/etcd/cluster.env (override with KCP_CLUSTER_ENV). Staging dir: KCP_RESTORE_DIR.
etcd's unit: KCP_ETCD_UNIT.
"""

MANIFEST = Path("/etc/kubernetes/manifests/kube-apiserver.yaml")
PARKED = Path("/etc/kubernetes/kube-apiserver.yaml.parked-by-etcd-restore")
SAFE_WORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
CHUNK = 1 << 20  # bytes per read of the snapshot stream: the file never sits in memory whole
POLL_SECONDS = 0.05  # members elect a leader within about a second of starting


def restoring_dir(env: ClusterEnv, token: str) -> Path:
    """The restored data dir, beside the live one until `switch`."""
    return Path(f"{env.data_dir}.restoring-{token}")


def stopped_units_file(env: ClusterEnv) -> Path:
    return Path(env.restore_dir) / "stopped-apiserver-units"


def open_endpoints(endpoints: Sequence[str]) -> list[str]:
    """The client endpoints that accept TCP: a dead member refuses at once, where etcdctl would wait
    for it until its command timeout."""
    def accepts(url: str) -> bool:
        parts = urlsplit(url)
        try:
            with socket.create_connection((parts.hostname or "", parts.port or 2379), timeout=1):
                return True
        except OSError:
            return False
    return [endpoint for endpoint in endpoints if accepts(endpoint)]


def quorum_seen(env: ClusterEnv, ctl: Etcdctl) -> bool:
    """Some endpoint answered a linearizable read, which needs a quorum."""
    endpoints = open_endpoints(env.client_endpoints)
    if not endpoints:
        log("no etcd endpoint accepts connections")
        return False
    answers = ctl.health(endpoints)
    for endpoint, healthy in answers.items():
        log(f"{endpoint} is {'healthy' if healthy else 'unhealthy'}")
    return any(answers.values())


# -- prepare ----------------------------------------------------------------------------
def read_header(source: BufferedReader) -> tuple[str, int]:
    """`snapshot NAME BYTES`: the snapshot's name and size; Abort on "abort" or anything else."""
    line = source.readline()
    if not line.endswith(b"\n"):
        raise Abort(1, "the operator sent no snapshot")
    header = line[:-1].decode(errors="replace")
    if header == "abort":
        raise Abort(1, "the operator stopped before sending a snapshot; nothing changed")
    words = header.split()
    if (not header.startswith("snapshot ") or len(words) != 3 or not SAFE_WORD.fullmatch(words[1])
            or not re.fullmatch(r"[0-9]+", words[2])):
        raise Abort(1, f"bad snapshot header '{header}'")
    return words[1], int(words[2])


def copy_exactly(source: BufferedReader, path: Path, size: int) -> int:
    """`size` bytes from the stream into `path` through one CHUNK-sized buffer; fewer only if the stream
    ended. (Faster than `dd bs=1M`, which it replaced: no allocation per chunk.)"""
    buffer = memoryview(bytearray(CHUNK))
    stored = 0
    with path.open("wb") as out:
        while stored < size and (got := source.readinto(buffer[:min(CHUNK, size - stored)])):
            out.write(buffer[:got])
            stored += got
    return stored


def receive(source: BufferedReader, stage: Path, name: str, size: int) -> Path:
    """Exactly `size` bytes of snapshot, then the verdict: the file of a snapshot the operator accepted;
    otherwise Abort, its partial copy deleted.

    The operator hashed the stream as it read it from the backup, once for all members; SSH's
    message authentication covers each member's copy.
    """
    file = stage / f"{name}.db"
    part = file.with_name(f"{file.name}.part")
    try:
        stored = copy_exactly(source, part, size)
    except OSError:
        part.unlink(missing_ok=True)
        raise Abort(1, f"REFUSED {name}: could not store it in {stage}") from None
    verdict = source.readline()
    if not verdict.endswith(b"\n"):
        refusal = f"the stream ended after {stored} of {size} bytes"
    elif verdict != b"ok\n":
        refusal = verdict[:-1].decode(errors="replace").removeprefix("refused ")
    elif stored != size:
        refusal = f"stored {stored} of {size} bytes"
    else:
        os.replace(part, file)
        return file
    part.unlink(missing_ok=True)
    raise Abort(1, f"REFUSED {name}: {refusal}")


def restore_beside(env: ClusterEnv, file: Path, name: str, token: str) -> None:
    """Restore the snapshot beside the live data dir: nothing changes until every member is ready.

    --skip-hash-check: the operator's sha256 covered every byte, etcd's own appended hash
    included, and equals the one recorded for a snapshot that passed verification (a full
    restore and a hashkv comparison), so neither etcd's hash pass nor a `snapshot status`
    pass adds a check. A file the restore cannot read still fails here, before anything
    live changes.
    """
    new = restoring_dir(env, token)
    shutil.rmtree(new, ignore_errors=True)
    proc = subprocess.run([snapshot_tool(), "snapshot", "restore", str(file), "--skip-hash-check",
                           "--data-dir", str(new), "--name", env.member_name, "--initial-cluster", env.initial_cluster,
                           "--initial-advertise-peer-urls", env.peer_url, "--initial-cluster-token", token],
                          capture_output=True, text=True, env=command_env(), check=False)
    if proc.returncode != 0:
        shutil.rmtree(new, ignore_errors=True)
        raise Abort(1, f"REFUSED {name}: snapshot restore failed: {last_line(proc.stderr or proc.stdout)}")
    chown_tree(new, "etcd")
    new.chmod(0o700)


def prepare(env: ClusterEnv, token: str) -> None:
    stage = Path(env.restore_dir)
    stage.mkdir(parents=True, exist_ok=True)
    stage.chmod(0o700)
    os.umask(0o077)  # the snapshot holds every secret of the cluster
    # The operator refuses to replace a cluster that still works: tell it what this member sees.
    print("quorum healthy" if quorum_seen(env, Etcdctl.of(env)) else "quorum none", flush=True)
    with open(sys.stdin.fileno(), "rb", closefd=False) as stdin:
        name, size = read_header(stdin)
        started = time.monotonic()
        file = receive(stdin, stage, name, size)
    received = time.monotonic() - started
    started = time.monotonic()
    restore_beside(env, file, name, token)
    restored = time.monotonic() - started
    log(f"received {size} bytes in {received:.2f}s; restored beside the live data in {restored:.2f}s")
    print(f"prepared {size} {received:.2f} {restored:.2f}")


# -- the API servers ----------------------------------------------------------------------
def stop_apiserver(env: ClusterEnv) -> None:
    """Park the static pod's manifest (kubelet stops it) and stop kube-apiserver* units; remembers which."""
    if MANIFEST.is_file():
        os.replace(MANIFEST, PARKED)
        log(f"parked {MANIFEST} (kubelet stops the API server)")
    listed = systemd.systemctl("list-units", "--all", "--plain", "--no-legend", "kube-apiserver*").stdout
    stopped = []
    for unit in (line.split()[0] for line in listed.splitlines() if line.strip()):
        if systemd.is_active(unit):
            systemd.act("stop", unit)
            stopped.append(unit)
            log(f"stopped {unit}")
    # Idempotent: a second run (nothing left to stop) keeps the list of the first.
    record = stopped_units_file(env)
    if stopped or not record.exists():
        write_atomic(record, "".join(f"{unit}\n" for unit in stopped))


def start_apiserver(env: ClusterEnv) -> None:
    if PARKED.is_file():
        os.replace(PARKED, MANIFEST)
        log(f"restored {MANIFEST}")
    record = stopped_units_file(env)
    if record.is_file():
        for unit in filter(None, record.read_text().split()):
            systemd.act("start", unit)
            log(f"started {unit}")
        record.unlink()


# -- switch, start, wait ------------------------------------------------------------------
def switch(env: ClusterEnv, token: str) -> None:
    new = restoring_dir(env, token)
    if not new.is_dir():
        raise Abort(1, f"no prepared data dir {new} (run prepare first)")
    unit = env.etcd_unit
    if systemd.has_unit(unit):
        # Killed, not stopped gracefully: a graceful stop hands leadership to another member, and
        # with every member stopping at once those handovers time out (~7 s with etcd 3.4). The
        # cluster is being replaced; its data dir, moved aside below, is crash-consistent as after
        # a power loss (etcd fsyncs its WAL before acknowledging a write).
        systemd.systemctl("kill", "--kill-whom=main", "--signal=SIGKILL", unit)
        systemd.act("stop", unit)
    # A join left over from member recovery would make etcd try to join the old cluster.
    Path(env.join_env).unlink(missing_ok=True)
    if os.path.exists(env.data_dir):
        aside = f"{env.data_dir}.pre-restore-{utc_stamp()}"
        if os.path.lexists(aside):
            aside = f"{aside}-{os.getpid()}"  # two restores within one second
        os.rename(env.data_dir, aside)
        log(f"moved the old data dir to {aside}")
    os.rename(new, env.data_dir)
    # Tells etcd-member-recovery that this data is a fresh restore: start on it, probe no one.
    write_atomic(env.restored_file, f"{token}\n")
    log(f"data dir restored (cluster token {token}); {unit} stays stopped until start-etcd")


def start_etcd(env: ClusterEnv) -> None:
    """Its own step, run once every member has switched: no member starts on restored data while
    another one is still stopping its old etcd.

    Returns once etcd itself runs (a main PID), at most ~2 s. A start that fails before that
    (member recovery refused, or systemd could not even spawn it: 219/CGROUP, seen on the nspawn
    test hosts) would otherwise be retried only after RestartSec: retry it at once, twice, then
    fail loudly with systemd's reason.
    """
    unit = env.etcd_unit
    if not systemd.has_unit(unit):
        return
    systemd.systemctl("reset-failed", unit)
    # --no-block: a member's start only completes once a quorum of restored members runs.
    systemd.act("start", "--no-block", unit)
    retries = 0
    for _ in range(40):
        main_pid = systemd.show(unit, "MainPID")
        if main_pid not in ("", "0"):
            log(f"{unit} started (etcd pid {main_pid})")
            return
        if systemd.show(unit, "SubState") in ("auto-restart", "failed"):
            why = f"result {systemd.show(unit, 'Result')}"
            if retries >= 2:
                raise Abort(1, f"{unit} failed to start 3 times (last: {why}); see journalctl -u {unit}")
            retries += 1
            log(f"{unit} failed to start ({why}); starting it again now instead of after RestartSec")
            systemd.systemctl("reset-failed", unit)
            systemd.act("restart", "--no-block", unit)
        time.sleep(POLL_SECONDS)
    log(f"{unit} is still starting")


def agreed_hashkv(ctl: Etcdctl, endpoints: list[str], revision: int) -> int | None:
    """The hashkv at `revision` once every member is healthy at that revision or later and all agree on it."""
    if open_endpoints(endpoints) != endpoints or not all(ctl.health(endpoints, timeout="5s").values()):
        return None
    try:
        statuses = ctl.json(endpoints, "endpoint", "status", dial="1s")
        if min((s["Status"]["header"]["revision"] for s in statuses), default=-1) < revision:
            return None
        answers = ctl.json(endpoints, "endpoint", "hashkv", f"--rev={revision}", dial="1s")
        hashes = {answer["HashKV"].get("hash", 0) for answer in answers}  # etcd omits a hash of 0
    except (EtcdError, KeyError, TypeError):
        return None
    return hashes.pop() if len(hashes) == 1 else None


def wait_healthy(env: ClusterEnv, revision: int, timeout: int) -> None:
    ctl = Etcdctl.of(env)
    endpoints = list(env.client_endpoints)
    started = time.monotonic()
    polls = 0
    while time.monotonic() < started + timeout:
        polls += 1
        hashkv = agreed_hashkv(ctl, endpoints, revision)
        if hashkv is not None:
            log(f"all {len(endpoints)} members healthy at revision >= {revision} after "
                f"{time.monotonic() - started:.2f}s ({polls} polls)")
            print(f"hashkv {hashkv}")
            return
        time.sleep(POLL_SECONDS)
    for endpoint, healthy in ctl.health(endpoints, timeout="5s").items():
        log(f"{endpoint} is {'healthy' if healthy else 'unhealthy'}")
    raise Abort(1, f"cluster not healthy at revision >= {revision} after {timeout}s")


# -- the command line ---------------------------------------------------------------------
def token_word(text: str) -> str:
    """The cluster token also names a directory: one word of letters, digits, `_.-`."""
    if not SAFE_WORD.fullmatch(text):
        raise argparse.ArgumentTypeError(f"bad token '{text}'")
    return text


STEPS: dict[str, Callable[[ClusterEnv, argparse.Namespace], None]] = {
    "prepare": lambda env, args: prepare(env, args.token),
    "stop-apiserver": lambda env, _: stop_apiserver(env),
    "switch": lambda env, args: switch(env, args.token),
    "start-etcd": lambda env, _: start_etcd(env),
    "wait-healthy": lambda env, args: wait_healthy(env, args.revision, args.timeout),
    "start-apiserver": lambda env, _: start_apiserver(env),
}


def run_step(env: ClusterEnv, args: argparse.Namespace) -> None:
    if args.step in ("prepare", "switch") and not args.token:
        raise Abort(1, f"{args.step} needs --token")
    if args.step == "wait-healthy" and args.revision is None:
        raise Abort(1, "wait-healthy needs --revision")
    STEPS[args.step](env, args)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="kcp-host etcd-restore-member", description=__doc__.splitlines()[0],
                                     epilog=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=STEPS, metavar="STEP")
    parser.add_argument("--token", type=token_word, help="the restored cluster's new token")
    parser.add_argument("--revision", type=int, help="the snapshot's revision (wait-healthy)")
    parser.add_argument("--timeout", type=int, default=120, help="seconds (wait-healthy; default: %(default)s)")
    args = parser.parse_args(argv)
    env = load_env(ClusterEnv)
    # The operator shows each member's lines under that member's name ("h2: REFUSED ..."): the
    # lines are prefixed with it, and a refusal is the step's answer, not tagged as an error.
    set_program(env.member_name)
    try:
        run_step(env, args)
    except Abort as stop:
        log(str(stop))
        return stop.code
    return 0
