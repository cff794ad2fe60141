"""etcd-restore-member: one etcd host's part of scripts/etcd-restore, one session with the operator, who moves every
member on only once all finished the previous phase (docs/backups.md has the protocol). Nothing live changes before
every member prepared the snapshot beside the live data, no etcd starts before every API server and old etcd stopped,
old data is moved aside, never deleted. Its answers on stdout (->), the operator's word on stdin (<-):

  restore --token T --bump-revision B
                      -> quorum healthy|none  <- snapshot NAME BYTES  -> room  <- send, BYTES, ok|refused REASON
                      -> prepared BYTES RECEIVE_S RESTORE_S PEAK_KIB TOOL_PEAK_KIB  <- switch  -> switched
                      <- start REVISION  -> healthy SECONDS KEYS  -> hashkv HASHKV  <- apiserver  -> done
  start-apiserver     put the manifest back, start the units a restore stopped (by hand, after a failed restore)
  retire-spare        on a spare: stop an etcd that took over a slot of the replaced cluster; back to watching
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
import shutil
import socket
import subprocess
import time
from io import BufferedReader
from pathlib import Path
from urllib.parse import urlsplit

from kcp_host import systemd
from kcp_host.contract import ClusterEnv, load_env
from kcp_host.etcd import Etcdctl, EtcdError, command_env, last_line, size_timeout, snapshot_tool
from kcp_host.files import chown_tree, copy_stream, flocked, utc_stamp, write_atomic
from kcp_host.log import Abort, log, set_program
from kcp_host.verify import hash_at, key_count

MANIFEST = Path("/etc/kubernetes/manifests/kube-apiserver.yaml")
PARKED = Path("/etc/kubernetes/kube-apiserver.yaml.parked-by-etcd-restore")
SAFE_WORD = r"[A-Za-z0-9][A-Za-z0-9_.-]*"  # the cluster token and the snapshot's name also name files
HEADER = re.compile(rf"snapshot ({SAFE_WORD}) ([0-9]+)\n")
POLL_SECONDS = 0.05
MIB, WAL_BYTES, MARGIN = 1 << 20, 64 << 20, 64 << 20  # a restored member's first WAL file is allocated whole


def order(stdin: BufferedReader, word: str) -> list[str]:
    """The operator's next line, which must start with `word`; anything else (abort, the end of input) stops here."""
    line = stdin.readline().decode(errors="replace").split()
    if line[:1] != [word]:
        raise Abort(1, f"the operator stopped the restore before {word}" + (f" ('{' '.join(line)[:80]}')"
                                                                            if line[:1] not in ([], ["abort"]) else ""))
    return line


def open_endpoints(endpoints: tuple[str, ...]) -> list[str]:
    """A dead member refuses TCP at once, where etcdctl would wait for it until its command timeout."""
    found = []
    for endpoint in endpoints:
        url = urlsplit(endpoint)
        with contextlib.suppress(OSError), socket.create_connection((url.hostname or "", url.port or 2379), 1):
            found.append(endpoint)
    return found


def check_room(env: ClusterEnv, size: int) -> None:
    """Before a byte moves: room for the file where it is staged and for the restored data beside the data dir."""
    Path(env.data_dir).parent.mkdir(parents=True, exist_ok=True)
    needs: dict[int, tuple[Path, int]] = {}  # by filesystem: the staging dir and the data dir may share one
    for path, need in ((Path(env.restore_dir), size), (Path(env.data_dir).parent, size + WAL_BYTES)):
        first, total = needs.get(path.stat().st_dev, (path, 0))
        needs[path.stat().st_dev] = (first, total + need)
    for path, need in needs.values():
        fs = os.statvfs(path)
        if (free := fs.f_bavail * fs.f_frsize) < need + MARGIN:
            raise Abort(1, f"no room for the restore: {path} has {free / MIB:.0f} MiB free, the restore needs "
                           f"{need / MIB:.0f} MiB there (the {size / MIB:.0f} MiB snapshot and/or the data restored "
                           f"from it with a {WAL_BYTES // MIB} MiB WAL) plus {MARGIN // MIB} MiB; nothing changed")


def receive(source: BufferedReader, stage: Path, name: str, size: int) -> Path:
    """Kept only after "ok": the operator hashed the stream once for all; SSH's MAC covers each member's copy."""
    part = stage / f"{name}.db.part"
    try:
        with part.open("wb") as out:
            stored = copy_stream(source, out, size)
        verdict = source.readline()
        if stored == size and verdict == b"ok\n":
            return part.rename(part.with_suffix(""))
    except OSError:
        raise Abort(1, f"REFUSED {name}: could not store it in {stage}") from None
    finally:
        part.unlink(missing_ok=True)  # a refused snapshot leaves nothing behind
    if stored < size or not verdict.endswith(b"\n"):
        raise Abort(1, f"REFUSED {name}: the stream ended after {stored} of {size} bytes")
    raise Abort(1, f"REFUSED {name}: {verdict[:-1].decode(errors='replace').removeprefix('refused ')}")


def memory_high_water() -> int:
    """This process's peak resident memory in KiB (VmHWM): bounded, never the file whole. Not ru_maxrss, which keeps
    the high-water mark of the process this one was forked from (exec resets VmHWM, not ru_maxrss)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def bump_flags(bump: int) -> list[str]:
    """etcdutl's flags that move the restored revision `bump` past the snapshot's and compact it there (3.5.13+).
    Checked before the session answers: an older tool refuses the restore before anything moves."""
    if not bump:
        return []
    tool = snapshot_tool()
    usage = subprocess.run([tool, "snapshot", "restore", "--help"], capture_output=True, text=True,
                           env=command_env(), check=False)
    if "--bump-revision" not in usage.stdout + usage.stderr:
        raise Abort(1, f"REFUSED: this member's {tool} cannot move the restored revision (etcd 3.5.13 or later "
                       "can); install it, or restore with --bump-revision 0 (docs/backups.md); nothing changed")
    return ["--bump-revision", str(bump), "--mark-compacted"]


def prepare(env: ClusterEnv, stdin: BufferedReader, new: Path, token: str, bump: list[str]) -> None:
    """Store the snapshot and restore it beside the live data, as this member of the configured cluster."""
    if not (words := HEADER.fullmatch(header := stdin.readline().decode(errors="replace"))):
        raise Abort(1, "the operator stopped before sending a snapshot; nothing changed" if header in ("abort\n", "")
                    else f"bad snapshot header '{header.strip()}'")
    name, size = words[1], int(words[2])
    check_room(env, size)
    print("room", flush=True)
    order(stdin, "send")
    started = time.monotonic()
    file = receive(stdin, Path(env.restore_dir), name, size)
    received = time.monotonic() - started
    # --skip-hash-check: the operator's sha256 covered every byte (etcd's appended hash too) and is the one recorded for
    # a snapshot that passed verification. A file the restore cannot read still fails here, before any live change.
    proc = subprocess.run([snapshot_tool(), "snapshot", "restore", str(file), "--skip-hash-check",
                           "--data-dir", str(new), "--name", env.member_name, "--initial-cluster", env.initial_cluster,
                           "--initial-advertise-peer-urls", env.peer_url, "--initial-cluster-token", token, *bump],
                          capture_output=True, text=True, env=command_env(), check=False)
    file.unlink()  # restored beside the live data, or refused: the staged copy (every secret) is not kept
    if proc.returncode != 0:
        raise Abort(1, f"REFUSED {name}: snapshot restore failed: {last_line(proc.stderr or proc.stdout)}")
    chown_tree(new, "etcd")  # etcdutl made it 0700 (and the umask could not allow more)
    restored = time.monotonic() - started - received
    peak = memory_high_water()
    tool_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    log(f"received {size} bytes in {received:.2f}s; restored beside the live data in {restored:.2f}s; peak memory "
        f"{peak // 1024} MiB, {snapshot_tool()} {tool_peak // 1024} MiB")
    print(f"prepared {size} {received:.2f} {restored:.2f} {peak} {tool_peak}", flush=True)


def stop_apiserver(env: ClusterEnv) -> None:
    if MANIFEST.is_file():
        os.replace(MANIFEST, PARKED)
        log(f"parked {MANIFEST} (kubelet stops the API server)")
    listed = systemd.systemctl("list-units", "--state=active,reloading", "--plain", "--no-legend", "kube-apiserver*")
    stopped = [line.split()[0] for line in listed.stdout.splitlines() if line.strip()]
    for unit in stopped:
        systemd.act("stop", unit)
        log(f"stopped {unit}")
    record = Path(env.restore_dir) / "stopped-apiserver-units"
    if stopped or not record.exists():  # idempotent: a second run (nothing left to stop) keeps the first one's list
        write_atomic(record, "".join(f"{unit}\n" for unit in stopped))


def start_apiserver(env: ClusterEnv, args: argparse.Namespace | None = None) -> None:
    if PARKED.is_file():
        os.replace(PARKED, MANIFEST)
        log(f"restored {MANIFEST}")
    record = Path(env.restore_dir) / "stopped-apiserver-units"
    if record.is_file():
        for unit in record.read_text().split():
            systemd.act("start", unit)
            log(f"started {unit}")
        record.unlink()


def switch(env: ClusterEnv, new: Path, token: str) -> None:
    # Killed, not stopped: with every member stopping at once, graceful leadership handovers time out (~7 s with
    # etcd 3.4). The data dir moved aside stays crash-consistent (etcd fsyncs its WAL before acknowledging).
    systemd.systemctl("kill", "--kill-whom=main", "--signal=SIGKILL", env.etcd_unit)
    systemd.act("stop", env.etcd_unit)
    Path(env.join_env).unlink(missing_ok=True)  # a join left over from member recovery: etcd would join the old cluster
    if os.path.exists(env.data_dir):
        aside = f"{env.data_dir}.pre-restore-{utc_stamp()}"
        os.rename(env.data_dir, aside)
        log(f"moved the old data dir to {aside}")
    os.rename(new, env.data_dir)
    write_atomic(env.restored_file, f"{token}\n")  # tells etcd-member-recovery: start on it, probe no one
    log(f"data dir restored (cluster token {token})")


def start_and_wait(env: ClusterEnv, revision: int, timeout: float) -> int:
    """Start etcd; once it is healthy through this member (a linearizable read: a quorum runs), its key count at
    `revision`. A start that fails before etcd runs (219/CGROUP on nspawn hosts) is retried at once, twice."""
    import http.client  # here, not at the top: every member starts its session sooner without them
    import ssl

    unit, url, context = env.etcd_unit, urlsplit(env.client_url), ssl.create_default_context(cafile=env.etcd_ca)
    context.verify_flags &= ~ssl.VERIFY_X509_STRICT  # Python 3.13 would refuse a CA without a key identifier
    context.load_cert_chain(env.etcd_cert, env.etcd_key)
    systemd.systemctl("reset-failed", unit)
    systemd.act("start", "--no-block", unit)  # a member's start completes only once a quorum of members runs
    deadline, retries = time.monotonic() + timeout, 0
    while time.monotonic() < deadline:
        try:  # etcd serves clients once it joined a leader: until then the handshake waits, not this loop
            conn = http.client.HTTPSConnection(url.hostname or "", url.port or 2379, context=context,
                                               timeout=max(1.0, deadline - time.monotonic()))
            conn.request("GET", "/health")
            if json.loads(conn.getresponse().read()).get("health") == "true":
                return key_count(Etcdctl.of(env), env.client_url, revision)
        except ConnectionRefusedError:  # not listening yet, or its start failed before etcd ran
            if systemd.show(unit, "SubState") in ("auto-restart", "failed"):
                if (retries := retries + 1) > 2:
                    raise Abort(1, f"{unit} failed to start 3 times; see journalctl -u {unit}") from None
                log(f"{unit} failed to start; starting it again now instead of after RestartSec")
                systemd.systemctl("reset-failed", unit)
                systemd.act("restart", "--no-block", unit)
        except (OSError, http.client.HTTPException, ValueError, EtcdError, KeyError, IndexError):
            pass
        time.sleep(POLL_SECONDS)
    raise Abort(1, f"etcd not healthy at revision >= {revision} through {env.client_url} after {timeout:.0f}s")


def restore(env: ClusterEnv, args: argparse.Namespace) -> None:
    stage = Path(env.restore_dir)
    stage.mkdir(parents=True, exist_ok=True)
    stage.chmod(0o700)
    os.umask(0o077)  # the snapshot holds every secret of the cluster
    reachable = open_endpoints(env.client_endpoints)
    healthy = [endpoint for endpoint, ok in (Etcdctl.of(env).health(reachable) if reachable else {}).items() if ok]
    log(f"healthy: {', '.join(healthy) or 'none'} ({len(reachable)} of {len(env.client_endpoints)} accept connections)")
    bump = bump_flags(args.bump_revision)
    print("quorum healthy" if healthy else "quorum none", flush=True)  # the operator won't replace a working cluster
    new = Path(f"{env.data_dir}.restoring-{args.token}")
    # One restore at a time on a member: a second operator's session would switch data dirs under the first.
    with flocked(stage / "restore.lock", what="restore of this member"), open(0, "rb", closefd=False) as stdin:
        try:
            prepare(env, stdin, new, args.token, bump)
            order(stdin, "switch")
        except BaseException:
            shutil.rmtree(new, ignore_errors=True)  # only what this restore prepared
            raise
        try:
            stop_apiserver(env)
            switch(env, new, args.token)
            print("switched", flush=True)
            revision = int(order(stdin, "start")[1])
            started = time.monotonic()
            keys = start_and_wait(env, revision, args.timeout)
            up = time.monotonic() - started
            print(f"healthy {up:.2f} {keys}", flush=True)
            # Then the hashkv, which the operator compares across members before any API server starts: it reads the
            # whole database while etcd's start-up compaction of the marked revision reads it too (seconds at 1 GB).
            database = Path(env.data_dir) / "member" / "snap" / "db"
            try:
                timeout = size_timeout(database.stat().st_size)
                hashkv = hash_at(Etcdctl.of(env), env.client_url, revision, timeout)["hashkv"]
            except (EtcdError, OSError) as error:
                raise Abort(1, f"no hashkv at revision {revision}: {error}") from None
            log(f"healthy at revision >= {revision} after {up:.2f}s with {keys} keys; hashkv {hashkv} after "
                f"{time.monotonic() - started - up:.2f}s more")
            print(f"hashkv {hashkv}", flush=True)
            order(stdin, "apiserver")
        except Abort as stop:
            raise Abort(stop.code, f"{stop}; its API server and a switched etcd stay down (docs/backups.md)") from None
        start_apiserver(env)
        print("done", flush=True)


def retire_spare(env: ClusterEnv, args: argparse.Namespace) -> None:
    """A spare that took over a slot belongs to the cluster the restore replaced: its etcd would retry forever."""
    from kcp_host.spare import SpareState  # here: a restore session needs none of it

    systemd.act("disable", "--now", env.etcd_unit)
    if os.path.exists(env.data_dir):
        os.rename(env.data_dir, f"{env.data_dir}.pre-restore-{utc_stamp()}")
    state = SpareState(env)
    for path in (state.report, state.intent, state.seen, Path(env.not_a_member_file), Path(env.join_env)):
        path.unlink(missing_ok=True)
    log("spare: etcd stopped and its takeover forgotten; watching the restored cluster again")


STEPS = {step.__name__.replace("_", "-"): step for step in (restore, start_apiserver, retire_spare)}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="kcp-host etcd-restore-member", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=STEPS, metavar="STEP")
    parser.add_argument("--token", help="the restored cluster's new token")
    parser.add_argument("--timeout", type=int, default=120, help="seconds to a healthy member (default: %(default)s)")
    parser.add_argument("--bump-revision", type=int, default=0, metavar="B",
                        help="restore at the snapshot's revision + B, compacted there (default: %(default)s)")
    args = parser.parse_args(argv)
    if (args.step == "restore" or args.token is not None) and not re.fullmatch(SAFE_WORD, args.token or ""):
        parser.error(f"restore needs --token (letters, digits, _.-): got '{args.token}'")
    env = load_env(ClusterEnv)
    set_program(env.member_name)  # the operator shows each line under the member's name ("h2: REFUSED ...")
    try:
        STEPS[args.step](env, args)
    except Abort as stop:
        log(str(stop))  # a refusal is the step's answer: no "ERROR:" tag
        return stop.code
    return 0
