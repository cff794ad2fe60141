"""etcd-restore-member: one etcd host's part of scripts/etcd-restore, which runs each step on every member at once
and moves on only once all succeeded. `prepare` changes nothing live, so a snapshot refused by any member leaves every
member untouched; old data is moved aside, never deleted. Protocol: components/restore/stream.py, docs/backups.md.

  prepare --token T   print "quorum healthy|none"; read "snapshot NAME BYTES" (or "abort"), BYTES, "ok|refused REASON";
                      only after "ok", restore beside the live data; print "prepared <bytes> <receive s> <restore s>"
  stop-apiserver      park the kube-apiserver static pod manifest, stop the active kube-apiserver* units
  switch --token T    kill etcd, move the data dir aside, put the prepared one in place; etcd stays down
  start-etcd          start etcd; return once it runs (a start that fails before that is retried at once, twice)
  wait-healthy --revision R [--timeout S]: until every member is healthy at >= R with one hashkv, print "hashkv H"
  start-apiserver     put the manifest back, start the units stop-apiserver stopped
  retire-spare        on a spare: stop an etcd that took over a slot of the replaced cluster; back to watching
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import socket
import subprocess
import time
from io import BufferedReader
from pathlib import Path
from urllib.parse import urlsplit

from kcp_host import systemd
from kcp_host.contract import ClusterEnv, load_env
from kcp_host.etcd import Etcdctl, EtcdError, command_env, last_line, snapshot_tool
from kcp_host.files import chown_tree, utc_stamp, write_atomic
from kcp_host.log import Abort, log, set_program
from kcp_host.spare import SpareState

MANIFEST = Path("/etc/kubernetes/manifests/kube-apiserver.yaml")
PARKED = Path("/etc/kubernetes/kube-apiserver.yaml.parked-by-etcd-restore")
SAFE_WORD = r"[A-Za-z0-9][A-Za-z0-9_.-]*"  # the cluster token and the snapshot's name also name files
HEADER = re.compile(rf"snapshot ({SAFE_WORD}) ([0-9]+)\n")
CHUNK = 1 << 20  # bytes per read of the snapshot stream: the file never sits in memory whole
POLL_SECONDS = 0.05  # members elect a leader within about a second of starting


def open_endpoints(endpoints: tuple[str, ...]) -> list[str]:
    """A dead member refuses TCP at once, where etcdctl would wait for it until its command timeout."""
    found = []
    for endpoint in endpoints:
        url = urlsplit(endpoint)
        with contextlib.suppress(OSError), socket.create_connection((url.hostname or "", url.port or 2379), 1):
            found.append(endpoint)
    return found


def receive(source: BufferedReader, stage: Path, name: str, size: int) -> Path:
    """Kept only after "ok": the operator hashed the stream once for all; SSH's MAC covers each member's copy."""
    part = stage / f"{name}.db.part"
    buffer = memoryview(bytearray(CHUNK))  # one buffer for every chunk: faster than the `dd bs=1M` it replaced
    stored = 0
    try:
        with part.open("wb") as out:
            while stored < size and (got := source.readinto(buffer[:min(CHUNK, size - stored)])):
                out.write(buffer[:got])
                stored += got
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


def prepare(env: ClusterEnv, args: argparse.Namespace) -> None:
    stage = Path(env.restore_dir)
    stage.mkdir(parents=True, exist_ok=True)
    stage.chmod(0o700)
    os.umask(0o077)  # the snapshot holds every secret of the cluster
    reachable = open_endpoints(env.client_endpoints)
    answers = Etcdctl.of(env).health(reachable) if reachable else {}
    healthy = [endpoint for endpoint, ok in answers.items() if ok]
    log(f"healthy: {', '.join(healthy) or 'none'} ({len(reachable)} of {len(env.client_endpoints)} accept connections)")
    print("quorum healthy" if healthy else "quorum none", flush=True)  # the operator won't replace a working cluster
    with open(0, "rb", closefd=False) as stdin:
        header = stdin.readline().decode(errors="replace")
        if header == "abort\n":
            raise Abort(1, "the operator stopped before sending a snapshot; nothing changed")
        if not (words := HEADER.fullmatch(header)):
            raise Abort(1, f"bad snapshot header '{header.strip()}'" if header else "the operator sent no snapshot")
        name, size = words[1], int(words[2])
        started = time.monotonic()
        file = receive(stdin, stage, name, size)
    received = time.monotonic() - started
    # --skip-hash-check: the operator's sha256 covered every byte, etcd's own appended hash too, and equals the one
    # recorded for a snapshot that passed verification (a full restore, a hashkv comparison), so neither etcd's hash
    # pass nor `snapshot status` adds a check. A file the restore cannot read still fails here, before any live change.
    new = Path(f"{env.data_dir}.restoring-{args.token}")
    proc = subprocess.run([snapshot_tool(), "snapshot", "restore", str(file), "--skip-hash-check",
                           "--data-dir", str(new), "--name", env.member_name, "--initial-cluster", env.initial_cluster,
                           "--initial-advertise-peer-urls", env.peer_url, "--initial-cluster-token", args.token],
                          capture_output=True, text=True, env=command_env(), check=False)
    if proc.returncode != 0:
        shutil.rmtree(new, ignore_errors=True)
        raise Abort(1, f"REFUSED {name}: snapshot restore failed: {last_line(proc.stderr or proc.stdout)}")
    chown_tree(new, "etcd")  # etcdutl made it 0700 (and the umask could not allow more)
    restored = time.monotonic() - started - received
    log(f"received {size} bytes in {received:.2f}s; restored beside the live data in {restored:.2f}s")
    print(f"prepared {size} {received:.2f} {restored:.2f}")


def stop_apiserver(env: ClusterEnv, args: argparse.Namespace) -> None:
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


def start_apiserver(env: ClusterEnv, args: argparse.Namespace) -> None:
    if PARKED.is_file():
        os.replace(PARKED, MANIFEST)
        log(f"restored {MANIFEST}")
    record = Path(env.restore_dir) / "stopped-apiserver-units"
    if record.is_file():
        for unit in record.read_text().split():
            systemd.act("start", unit)
            log(f"started {unit}")
        record.unlink()


def switch(env: ClusterEnv, args: argparse.Namespace) -> None:
    new = Path(f"{env.data_dir}.restoring-{args.token}")
    if not new.is_dir():
        raise Abort(1, f"no prepared data dir {new} (run prepare first)")
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
    write_atomic(env.restored_file, f"{args.token}\n")  # tells etcd-member-recovery: start on it, probe no one
    log(f"data dir restored (cluster token {args.token}); {env.etcd_unit} stays stopped until start-etcd")


def start_etcd(env: ClusterEnv, args: argparse.Namespace) -> None:
    """Retries at once a start that fails before etcd runs (219/CGROUP on nspawn hosts), not after RestartSec."""
    unit = env.etcd_unit
    systemd.systemctl("reset-failed", unit)
    systemd.act("start", "--no-block", unit)  # a member's start completes only once a quorum of members runs
    retries = 0
    for _ in range(40):  # about 2 s: this step returns once etcd itself runs (a main PID)
        if (main_pid := systemd.show(unit, "MainPID")) not in ("", "0"):
            log(f"{unit} started (etcd pid {main_pid})")
            return
        if systemd.show(unit, "SubState") in ("auto-restart", "failed"):
            why = f"result {systemd.show(unit, 'Result')}"
            if retries == 2:
                raise Abort(1, f"{unit} failed to start 3 times (last: {why}); see journalctl -u {unit}")
            retries += 1
            log(f"{unit} failed to start ({why}); starting it again now instead of after RestartSec")
            systemd.systemctl("reset-failed", unit)
            systemd.act("restart", "--no-block", unit)
        time.sleep(POLL_SECONDS)
    log(f"{unit} is still starting")


def agreed_hashkv(ctl: Etcdctl, endpoints: tuple[str, ...], revision: int) -> int | None:
    """None until every member is healthy at `revision` or later and all agree on its hashkv."""
    with contextlib.suppress(EtcdError, KeyError, TypeError):
        if open_endpoints(endpoints) == list(endpoints) and all(ctl.health(endpoints, timeout="5s").values()):
            statuses = ctl.json(endpoints, "endpoint", "status", dial="1s")
            if min(status["Status"]["header"]["revision"] for status in statuses) >= revision:
                answers = ctl.json(endpoints, "endpoint", "hashkv", f"--rev={revision}", dial="1s")
                hashes = {answer["HashKV"].get("hash", 0) for answer in answers}  # etcd omits a hash of 0
                return hashes.pop() if len(hashes) == 1 else None
    return None


def wait_healthy(env: ClusterEnv, args: argparse.Namespace) -> None:
    ctl = Etcdctl.of(env)
    started = time.monotonic()
    polls = 1
    while (hashkv := agreed_hashkv(ctl, env.client_endpoints, args.revision)) is None:
        if time.monotonic() >= started + args.timeout:
            answers = ctl.health(env.client_endpoints, timeout="5s")
            unhealthy = ", ".join(endpoint for endpoint, ok in answers.items() if not ok) or "none"
            raise Abort(1, f"cluster not healthy at revision >= {args.revision} after {args.timeout}s "
                           f"(unhealthy: {unhealthy})")
        time.sleep(POLL_SECONDS)
        polls += 1
    log(f"all {len(env.client_endpoints)} members healthy at revision >= {args.revision} after "
        f"{time.monotonic() - started:.2f}s ({polls} polls)")
    print(f"hashkv {hashkv}")


def retire_spare(env: ClusterEnv, args: argparse.Namespace) -> None:
    """A spare that took over a slot belongs to the cluster the restore replaced: its etcd would retry forever."""
    systemd.act("disable", "--now", env.etcd_unit)
    if os.path.exists(env.data_dir):
        os.rename(env.data_dir, f"{env.data_dir}.pre-restore-{utc_stamp()}")
    state = SpareState(env)
    for path in (state.report, state.intent, state.seen, Path(env.not_a_member_file), Path(env.join_env)):
        path.unlink(missing_ok=True)
    log("spare: etcd stopped and its takeover forgotten; watching the restored cluster again")


STEPS = {step.__name__.replace("_", "-"): step for step in (prepare, stop_apiserver, switch, start_etcd, wait_healthy,
                                                            start_apiserver, retire_spare)}
NEEDS = {"prepare": "token", "switch": "token", "wait-healthy": "revision"}  # step -> the option it cannot do without


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="kcp-host etcd-restore-member", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=STEPS, metavar="STEP")
    parser.add_argument("--token", help="the restored cluster's new token")
    parser.add_argument("--revision", type=int, help="the snapshot's revision")
    parser.add_argument("--timeout", type=int, default=120, help="seconds (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.token is not None and not re.fullmatch(SAFE_WORD, args.token):
        parser.error(f"bad token '{args.token}'")
    env = load_env(ClusterEnv)
    set_program(env.member_name)  # the operator shows each line under the member's name ("h2: REFUSED ...")
    try:
        if (option := NEEDS.get(args.step)) and getattr(args, option) is None:
            raise Abort(1, f"{args.step} needs --{option}")
        STEPS[args.step](env, args)
    except Abort as stop:
        log(str(stop))  # a refusal is the step's answer: no "ERROR:" tag
        return stop.code
    return 0
