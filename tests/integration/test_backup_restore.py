"""Backups and restores on the deployed local cluster, with real etcd, sshd and systemd.

One module-scoped deployment; the tests run in file order and build on each other:
load ~100 MB, back up, refuse bad snapshots, restore after every member lost its data.
The tests start etcd-backup.service themselves, so the timer's wall-clock slots are paused
for the module (after checking the timer is active): a slot that fired mid-test would add
a snapshot that no test asked for.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shlex
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kcp_host.contract import AGENT, ClusterEnv, render_env
from testbed.network import gateway_address
from tests.figures import record
from tests.integration.conftest import Deployment
from tests.program import ROOT

pytestmark = pytest.mark.integration
VENV_BIN = Path(sys.executable).parent
REGRESSION_RATIO = 8.0

KEYS = 10_000
PREFIX = "/bench/"
SSH_OPTIONS = ["--ssh-option", "StrictHostKeyChecking=no", "--ssh-option", "UserKnownHostsFile=/dev/null",
               "--ssh-option", "LogLevel=ERROR"]
state: dict[str, Any] = {}
# systemd's "could not put the process into the unit's cgroup" (the program never ran).
EXIT_CGROUP = "219"


def pause_backup_timers(dep: Deployment) -> None:
    """Check the deployed timer runs on every member, then pause it for this module's tests."""
    for m in dep.members:
        state_now = dep.sandbox.ssh(m, "systemctl is-active etcd-backup.timer", check=False).stdout.decode().strip()
        assert state_now in ("active", "inactive"), f"{m}: etcd-backup.timer is {state_now}"
        dep.sandbox.ssh(m, "systemctl stop etcd-backup.timer")


@pytest.fixture(scope="module", autouse=True)
def backups_on_demand(local_cluster: Deployment) -> None:
    pause_backup_timers(local_cluster)


def value_of(key: str) -> str:
    """~10 KB, derived from the key, so 10,000 keys make a ~100 MB database we can check exactly."""
    return hashlib.sha256(key.encode()).hexdigest() * 160


def load_keys(dep: Deployment, host: str, count: int, prefix: str) -> None:
    """Write keys in transactions of 100 puts (~1 MB each, under etcd's request limit)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for n, start in enumerate(range(0, count, 100)):
            keys = [f"{prefix}k{i:05d}" for i in range(start, min(count, start + 100))]
            data = ("\n" + "".join(f"put {k} {value_of(k)}\n" for k in keys) + "\n\n").encode()
            info = tarfile.TarInfo(f"b{n:04d}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    command = ('set -e; d=$(mktemp -d); tar -C "$d" -x; . /etc/etcd/cluster.env; for f in "$d"/*; do '
               'etcdctl --endpoints="$KCP_CLIENT_ENDPOINTS" --cacert="$KCP_ETCD_CA" --cert="$KCP_ETCD_CERT" '
               '--key="$KCP_ETCD_KEY" --command-timeout=30s txn <"$f" >/dev/null || { sleep 2; etcdctl '
               '--endpoints="$KCP_CLIENT_ENDPOINTS" --cacert="$KCP_ETCD_CA" --cert="$KCP_ETCD_CERT" '
               '--key="$KCP_ETCD_KEY" --command-timeout=30s txn <"$f" >/dev/null; }; done; rm -rf "$d"')
    dep.sandbox.ssh(host, command, input=buf.getvalue(), timeout=600)


def fields(out: bytes, name: str) -> list[str]:
    return [line.split(" : ", 1)[1].strip('"') for line in out.decode().splitlines() if line.startswith(f'"{name}"')]


def cluster_state(dep: Deployment) -> tuple[set[str], set[str]]:
    """(revisions, hashkvs at the lowest revision) over all members."""
    revs = fields(dep.etcdctl(dep.members[0], "endpoint", "status", "-w", "fields").stdout, "Revision")
    low = min(int(r) for r in revs)
    hashes = fields(dep.etcdctl(dep.members[0], "endpoint", "hashkv", f"--rev={low}", "-w", "fields").stdout, "Hash")
    return set(revs), set(hashes)


def backup_dir(dep: Deployment) -> str:
    bm = dep.config["baremetal"]
    return f"{bm['backupHost']['path'].rstrip('/')}/{dep.config['clusterName']}"


def backups(dep: Deployment, sub: str = "") -> dict[str, dict[str, Any]]:
    out = dep.sandbox.ssh(dep.backup_host, f'cd {backup_dir(dep)}/{sub} && for f in *-*.json; do [ -f "$f" ] && '
                          '{ cat "$f"; printf "\\036"; }; done; true').stdout.decode()
    metas = [json.loads(doc) for doc in out.split("\x1e") if doc.strip()]
    return {m["name"]: m for m in metas}


def start_backup_units(dep: Deployment, members: list[str]) -> dict[str, tuple[int, str, str]]:
    """`systemctl start etcd-backup.service` on these members at once: (exit, stderr, ExecMainStatus)."""
    command = ("systemctl start etcd-backup.service; rc=$?; "
               "echo \"$rc $(systemctl show -p ExecMainStatus --value etcd-backup.service)\"")
    procs = {m: subprocess.Popen([*dep.sandbox.ssh_argv(m), command], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for m in members}
    results = {}
    for m, proc in procs.items():
        out, err = proc.communicate(timeout=600)
        rc, _, status = out.decode().strip().partition(" ")
        results[m] = (int(rc or proc.returncode), err.decode().strip(), status)
    return results


def run_backup_everywhere(dep: Deployment) -> dict[str, Any]:
    """Start the timer's unit on every member at once, as the timer does; exactly one acts.

    On these test hosts all containers share one cgroup-v1 `name=systemd` tree (nspawn
    without a host systemd), so a unit of the same name starting in two containers at once
    can lose its cgroup directory to the other container's cleanup: systemd then fails the
    start with status 219/CGROUP before etcd-backup runs at all. Only such a start, in which
    the program never ran, is started again (once); any failure of etcd-backup itself fails.
    """
    before = set(backups(dep))
    started = time.monotonic()
    results = start_backup_units(dep, dep.members)
    never_ran = [m for m, (rc, _, status) in results.items() if rc != 0 and status == EXIT_CGROUP]
    if never_ran:
        print(f"\n(test hosts' shared cgroup tree: etcd-backup.service never ran on {never_ran}; starting it again)")
        results.update(start_backup_units(dep, never_ran))
    elapsed = time.monotonic() - started
    assert all(rc == 0 for rc, _, _ in results.values()), f"a backup unit failed: {results}"
    new = set(backups(dep)) - before
    assert len(new) == 1, f"expected one snapshot cluster-wide per run, got {sorted(new)}"
    meta = backups(dep)[new.pop()]
    meta["_seconds"] = elapsed
    return meta


def etcd_restore(dep: Deployment, *extra: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, str(ROOT / "scripts" / "etcd-restore"), "--stack", str(dep.stack_file), *SSH_OPTIONS,
            "--json", *extra]
    return subprocess.run(argv, capture_output=True, text=True, timeout=900, check=False, env=env)


def lose_every_members_data(dep: Deployment) -> None:
    for m in dep.members:
        dep.sandbox.ssh(m, ". /etc/etcd/cluster.env; systemctl stop etcd; rm -rf \"$KCP_DATA_DIR\"")


def test_only_the_leader_takes_a_verified_snapshot_of_100mb(local_cluster: Deployment) -> None:
    dep = local_cluster
    load_keys(dep, dep.members[0], KEYS, PREFIX)
    meta = run_backup_everywhere(dep)
    assert meta["verified"] is True, meta
    assert meta["keys"] >= KEYS and meta["size"] > 90 * 1024 * 1024, meta
    revs, _ = cluster_state(dep)
    assert {str(meta["revision"])} == revs, "nothing wrote after the snapshot, so the revision must match"
    status = json.loads(dep.sandbox.ssh(dep.backup_host, f"cat {backup_dir(dep)}/status.json").stdout)
    assert status["last_snapshot"] == meta["name"] and status["last_verified"]
    print(f"\nbackup of {meta['size'] / 1e6:.0f} MB: {meta['_seconds']:.2f}s total, "
          f"snapshot {meta['snapshot_seconds']}s, verify {meta['verify_seconds']}s")
    state["backup"] = meta


@pytest.mark.parametrize("damage", ["flip one byte", "truncate"])
def test_corrupt_snapshot_is_refused_and_cluster_untouched(local_cluster: Deployment, damage: str) -> None:
    dep = local_cluster
    good = state["backup"]
    bad = f"{dep.config['clusterName']}-20000101T00000{1 if damage == 'truncate' else 2}Z"
    edit = ("printf '\\x00' | dd of=$f.db bs=1 seek=4096 count=1 conv=notrunc 2>/dev/null; "
            "{ ! cmp -s $f.db $g.db || printf '\\x01' | dd of=$f.db bs=1 seek=4096 count=1 conv=notrunc 2>/dev/null; }"
            if damage == "flip one byte" else "truncate -s -1000 $f.db")
    d = backup_dir(dep)
    dep.sandbox.ssh(dep.backup_host, f"cd {d} && f={bad} g={good['name']} && cp $g.db $f.db && "
                    f"sed 's/{good['name']}/{bad}/' $g.json > $f.json && {edit} && ! cmp -s $f.db $g.db")
    before = cluster_state(dep)
    try:
        proc = etcd_restore(dep, "--snapshot", bad, "--force")
    finally:
        dep.sandbox.ssh(dep.backup_host, f"rm -f {d}/{bad}.db {d}/{bad}.json")
    assert proc.returncode == 1 and "REFUSED" in proc.stderr, proc.stderr
    assert cluster_state(dep) == before, "a refused restore must leave the cluster as it was"
    for m in dep.members:
        aside = dep.sandbox.ssh(m, ". /etc/etcd/cluster.env; ls -d $KCP_DATA_DIR.pre-restore-* 2>/dev/null; true")
        assert not aside.stdout.strip(), f"{m}: data dir was moved although the snapshot was refused"


def test_restore_refuses_while_the_cluster_has_a_healthy_quorum(local_cluster: Deployment) -> None:
    dep = local_cluster
    before = cluster_state(dep)
    proc = etcd_restore(dep)
    assert proc.returncode == 1 and "healthy quorum" in proc.stderr, proc.stderr
    assert cluster_state(dep) == before


def test_restore_refuses_when_a_member_cannot_take_part(local_cluster: Deployment) -> None:
    """A host that cannot run the restore (here one without the etcd programs) stops it before any byte moves."""
    dep = local_cluster
    before = cluster_state(dep)
    hosts = [f"{m}={dep.sandbox.address(m)}" for m in dep.members[:2]] + [f"outsider={dep.sandbox.address('outsider')}"]
    proc = etcd_restore(dep, "--hosts", ",".join(hosts), "--force")
    assert proc.returncode == 1, proc.stderr
    assert "outsider did not answer" in proc.stderr and "kcp-host" in proc.stderr, proc.stderr
    assert cluster_state(dep) == before
    for m in dep.members[:2]:
        left = dep.sandbox.ssh(m, ". /etc/etcd/cluster.env; ls -d /var/lib/etcd-restore/*.part "
                               "$KCP_DATA_DIR.restoring-* 2>/dev/null; true").stdout.strip()
        assert not left, f"{m}: a refused restore left {left!r}"


def bare_restore_seconds(dep: Deployment, host: str, name: str, runs: int = 3) -> list[float]:
    """`etcdctl snapshot restore` of the same file, alone, on one member, as a user would run it.

    The restore a user runs for this member: the file the restore staged there, this
    member's name, peer URL and the cluster's --initial-cluster, etcd's default hash check
    (not skipped), a data dir on the same disk as the member's. Timed on the host's clock
    around that one command only (not the clean-up); `runs` times, the file in the page
    cache as it is for the restore itself.
    """
    script = (f"set -e; . /etc/etcd/cluster.env; f=/var/lib/etcd-restore/{name}.db; "
              "d=$KCP_DATA_DIR.bare-restore-test; for i in $(seq 1 " + str(runs) + "); do rm -rf \"$d\"; "
              "s=$EPOCHREALTIME; etcdctl snapshot restore \"$f\" --data-dir \"$d\" --name \"$KCP_MEMBER_NAME\" "
              "--initial-cluster \"$(tr ' ' ',' <<<\"$KCP_MEMBERS\")\" --initial-advertise-peer-urls \"$KCP_PEER_URL\" "
              "--initial-cluster-token bare-restore-test >/dev/null 2>&1; e=$EPOCHREALTIME; "
              "echo \"$s $e\"; done; rm -rf \"$d\"")
    out = dep.sandbox.ssh(host, f"bash -c {shlex.quote(script)}").stdout.decode().split()
    return [float(e) - float(s) for s, e in zip(out[0::2], out[1::2], strict=True)]


def test_restore_after_every_member_lost_its_data_finds_every_key(local_cluster: Deployment) -> None:
    dep = local_cluster
    meta = state["backup"]
    dep.etcdctl(dep.members[0], "put", "/after-backup/k", "lost")
    lose_every_members_data(dep)
    proc = etcd_restore(dep)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["snapshot"] == meta["name"] and report["hashkv"] == meta["hashkv"]
    out = dep.etcdctl(dep.members[1], "get", PREFIX, "--prefix", timeout=300).stdout.decode().split("\n")
    found = dict(zip(out[0::2], out[1::2], strict=False))
    wanted = [f"{PREFIX}k{i:05d}" for i in range(KEYS)]
    missing = [k for k in wanted if found.get(k) != value_of(k)]
    assert not missing, f"{len(missing)} keys missing or wrong after restore, e.g. {missing[:3]}"
    after = dep.etcdctl(dep.members[2], "get", "/after-backup/k").stdout.strip()
    assert not after, "a write made after the backup came back"
    bares = bare_restore_seconds(dep, dep.members[0], meta["name"])
    bare = sorted(bares)[len(bares) // 2]
    rto = report["rto_seconds"]
    ratio = rto / bare
    print(f"\nrestore RTO {rto:.2f}s, steps {report['steps']}, members {report['members']}; bare snapshot restore "
          f"on {dep.members[0]}: {', '.join(f'{b:.2f}s' for b in bares)} (median {bare:.2f}s); ratio {ratio:.1f}")
    record("restore RTO (100 MB, 3 members)", rto, "bare snapshot restore on one member", bare,
           "issue 5 asks ratio <= 3; not met on this 2-core test bed")
    # Issue 5's bar is a ratio of 3. On this test bed all three members, the operator and
    # the backup host share 2 cores, and the restore streams, hashes and restores the file
    # three times in parallel: about 6 was measured (docs/backups.md has the breakdown).
    # This guard catches regressions; it is not the bar, which stays open.
    assert ratio <= REGRESSION_RATIO, f"restore RTO {rto:.2f}s is {ratio:.1f}x a bare restore ({bare:.2f}s)"


def receiver(dep: Deployment, request: str, payload: bytes, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    """Talk to the backup host exactly as an etcd host does: its key, the forced command."""
    command = (". /etc/etcd/backup.env; d=${KCP_BACKUP_DEST#ssh://}; ssh -i \"$KCP_BACKUP_SSH_KEY\" -o BatchMode=yes "
               "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR "
               f"\"${{d%%/*}}\" {shlex.quote(request)}")
    return dep.sandbox.ssh(dep.members[0], command, input=payload, check=check)


def fake_pair(name: str, verified: bool = True) -> tuple[bytes, bytes]:
    db = name.encode() * 100
    meta = (f'{{\n  "name": "{name}",\n  "sha256": "{hashlib.sha256(db).hexdigest()}",\n  '
            f'"verified": {"true" if verified else "false"},\n  "verify_error": "",\n  "format": 1\n}}\n')
    return db, meta.encode()


def expected_kept(names: list[str], recent: int, daily: int, cluster: str) -> set[str]:
    """docs/backups.md: the newest `recent`, plus the first snapshot of each of the newest `daily` days."""
    ordered = sorted(names, reverse=True)
    first_of_day: dict[str, str] = {}
    for n in sorted(names):
        first_of_day.setdefault(n[len(cluster) + 1:][:8], n)
    days = sorted(first_of_day, reverse=True)[:daily]
    return set(ordered[:recent]) | {first_of_day[d] for d in days}


def test_backup_host_retention_keeps_exactly_the_configured_counts(local_cluster: Deployment) -> None:
    dep = local_cluster
    cluster = dep.config["clusterName"]
    retain = dep.config["backup"]["retain"]
    offered = set(backups(dep))
    for day in range(1, 7):
        for hour in (1, 2, 3):
            name = f"{cluster}-200101{day:02d}T{hour:02d}0000Z"
            db, meta = fake_pair(name)
            receiver(dep, f"put {name}.db", db)
            receiver(dep, f"put {name}.json", meta)
            offered.add(name)
    kept = set(backups(dep))
    want = expected_kept(list(offered), retain["recent"], retain["daily"], cluster)
    assert kept == want, f"kept {sorted(kept)}, expected {sorted(want)}"
    newest = sorted(offered, reverse=True)[: retain["recent"]]
    days = sorted({n[len(cluster) + 1:][:8] for n in offered}, reverse=True)[: retain["daily"]]
    assert len(newest) == retain["recent"] and len(days) == retain["daily"], "the test must fill every slot"
    status = json.loads(dep.sandbox.ssh(dep.backup_host, f"cat {backup_dir(dep)}/status.json").stdout)
    assert (status["kept_recent"], status["kept_daily"]) == (retain["recent"], retain["daily"])


def test_backup_key_is_write_only_and_bad_snapshots_are_set_apart(local_cluster: Deployment) -> None:
    dep = local_cluster
    cluster = dep.config["clusterName"]
    existing = next(iter(backups(dep)))
    assert receiver(dep, f"put {existing}.json", b"{}", check=False).returncode != 0, "overwrote a backup"
    for request in ("cat /etc/passwd", f"put ../{cluster}-20010101T000000Z.db", "put x.db", "get status.json"):
        assert receiver(dep, request, b"x", check=False).returncode != 0, f"receiver accepted {request!r}"
    name = f"{cluster}-20010201T000000Z"
    db, meta = fake_pair(name, verified=False)
    receiver(dep, f"put {name}.db", db)
    assert receiver(dep, f"put {name}.json", meta, check=False).returncode != 0, "a bad snapshot must fail loudly"
    assert name in backups(dep, "bad") and name not in backups(dep)
    status = json.loads(dep.sandbox.ssh(dep.backup_host, f"cat {backup_dir(dep)}/status.json").stdout)
    assert name in status["last_failure_reason"]


def test_verification_catches_a_wrong_recorded_key_count(local_cluster: Deployment) -> None:
    dep = local_cluster
    meta = run_backup_everywhere(dep)
    wrong_keys = ('import json, sys; m = json.load(open(sys.argv[1])); m["keys"] += 1; '
                  'json.dump(m, open("/tmp/wrong.json", "w"))')
    script = (f'set -e; db=/var/lib/etcd-backup/{meta["name"]}.db; '
              f'python3 -c {shlex.quote(wrong_keys)} "${{db%.db}}.json"; '
              f'rc=0; {AGENT} etcd-backup-verify --update "$db" /tmp/wrong.json || rc=$?; echo "rc=$rc"; '
              'cat /tmp/wrong.json; echo; echo ---; '
              '(exec 3<>/dev/tcp/127.0.0.1/23790) 2>/dev/null && echo PORT-STILL-OPEN; '
              'ls -d /var/lib/etcd-backup/verify.* 2>/dev/null || true')
    out = dep.sandbox.ssh(meta["member"], script).stdout.decode()
    head, _, left = out.partition("\n---\n")
    rc, _, written = head.partition("\n")
    assert rc == "rc=1", out
    result = json.loads(written)
    assert result["verified"] is False and "key count" in result["verify_error"], out
    assert "PORT-STILL-OPEN" not in left and "verify." not in left, "throwaway etcd or scratch dir left"


# --- the S3 destination and the restore from a bucket, against moto's S3 server -------------------
# moto (a local S3 API, named as the stand-in it is) runs on the sandbox bridge's address, reachable
# from the host namespaces. etcd-backup itself runs on this machine inside the backup host's network
# namespace (which the firewall lets reach etcd), with the member's etcd binaries and backup
# certificate and the AWS CLI from the test venv: the same script and the same `aws` commands that
# run on AWS hosts. A real bucket's lifecycle rules are not exercised here (moto does not expire).

BUCKET = "kcp-test-etcd-backups"


@pytest.fixture(scope="module")
def s3(local_cluster: Deployment, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """moto's S3 server with a versioned bucket; the environment that points the AWS CLI at it."""
    address = gateway_address(local_cluster.sandbox.subnet)
    with socket.socket() as probe:
        probe.bind((address, 0))
        port = probe.getsockname()[1]
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with log.open("wb") as out:
        server = subprocess.Popen([str(VENV_BIN / "moto_server"), "-H", address, "-p", str(port)],
                                  stdout=out, stderr=subprocess.STDOUT)
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://{address}:{port}",
           "PATH": f"{VENV_BIN}:{os.environ['PATH']}"}
    try:
        deadline = time.monotonic() + 30
        while subprocess.run(["aws", "s3api", "list-buckets"], env=env, capture_output=True).returncode != 0:
            assert time.monotonic() < deadline and server.poll() is None, log.read_text()
            time.sleep(0.2)
        for args in (["create-bucket", "--bucket", BUCKET],
                     ["put-bucket-versioning", "--bucket", BUCKET, "--versioning-configuration", "Status=Enabled"]):
            subprocess.run(["aws", "s3api", *args], env=env, capture_output=True, check=True)
        yield env
    finally:
        server.terminate()
        server.wait(timeout=10)


def backup_to_s3(dep: Deployment, env: dict[str, str], work: Path) -> dict[str, Any]:
    """Run the agent's etcd-backup with an s3:// destination, as h1 would; the metadata of the snapshot it made."""
    if not (work / "bin" / "etcd").exists():
        (work / "bin").mkdir(parents=True)
        for source, target in (("/usr/local/bin/etcd", "bin/etcd"), ("/usr/local/bin/etcdctl", "bin/etcdctl"),
                               ("/etc/etcd/pki/ca.crt", "ca.crt"), ("/etc/etcd/pki/backup-client.crt", "backup.crt"),
                               ("/etc/etcd/pki/backup-client.key", "backup.key")):
            (work / target).write_bytes(dep.sandbox.ssh(dep.members[0], f"cat {source}").stdout)
            (work / target).chmod(0o700)
        h1 = dep.sandbox.address(dep.members[0])
        (work / "cluster.env").write_text(render_env(ClusterEnv(
            cluster_name=dep.config["clusterName"], member_name="h1", peer_url=f"https://{h1}:2380",
            client_url=f"https://{h1}:2379", members=(f"h1=https://{h1}:2380",), client_endpoints=(f"https://{h1}:2379",),
            etcd_ca=f"{work}/ca.crt", etcd_cert=f"{work}/backup.crt", etcd_key=f"{work}/backup.key",
            data_dir=f"{work}/unused-data", etcdctl=f"{work}/bin/etcdctl"), "h1's view, for a backup run from here"))
        (work / "backup.env").write_text(f"KCP_BACKUP_DEST=s3://{BUCKET}/local\nKCP_BACKUP_CERT={work}/backup.crt\n"
                                         f"KCP_BACKUP_KEY={work}/backup.key\nKCP_BACKUP_WORK_DIR={work}/work\n"
                                         "KCP_BACKUP_VERIFY=true\n")
    run_env = {**env, "PATH": f"{work}/bin:{env['PATH']}", "KCP_CLUSTER_ENV": str(work / "cluster.env"),
               "KCP_BACKUP_ENV": str(work / "backup.env")}
    env_args = [f"{k}={v}" for k, v in run_env.items() if k.startswith(("AWS_", "KCP_")) or k == "PATH"]
    proc = dep.sandbox.run_in_netns(dep.backup_host, ["env", *env_args, f"PYTHONPATH={ROOT}", sys.executable, "-m",
                                                      "kcp_host", "etcd-backup", "--any-member"], timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()
    name = json.loads((work / "work" / "status.json").read_text())["last_snapshot"]
    return json.loads((work / "work" / f"{name}.json").read_text())


def s3api(env: dict[str, str], *args: str) -> Any:
    proc = subprocess.run(["aws", "s3api", *args, "--bucket", BUCKET, "--output", "json"], env=env,
                          capture_output=True, text=True, check=False)
    return json.loads(proc.stdout or "null") if proc.returncode == 0 else proc.stderr


def test_s3_destination_keeps_versions_with_their_metadata(local_cluster: Deployment, s3: dict[str, str],
                                                           tmp_path: Path) -> None:
    dep = local_cluster
    work = tmp_path / "s3-backup"
    dep.etcdctl(dep.members[0], "put", "/s3/first", "1")
    first = backup_to_s3(dep, s3, work)
    dep.etcdctl(dep.members[0], "put", "/s3/second", "2")
    time.sleep(1)  # snapshot names have one-second resolution
    second = backup_to_s3(dep, s3, work)
    assert first["verified"] is True and second["verified"] is True and second["revision"] > first["revision"]
    versions = s3api(s3, "list-object-versions", "--prefix", "local/")["Versions"]
    count = {key: sum(v["Key"] == key for v in versions)
             for key in ("local/recent/snapshot.db", "local/recent/snapshot.json", "local/daily/snapshot.db",
                         "local/status.json")}
    # Both runs land in recent/; only the first of the UTC day also in daily/ (create-only marker).
    assert count == {"local/recent/snapshot.db": 2, "local/recent/snapshot.json": 2, "local/daily/snapshot.db": 1,
                     "local/status.json": 2}, count
    today = time.strftime("%Y-%m-%d", time.gmtime())
    assert s3api(s3, "head-object", "--key", f"local/daily-markers/{today}")["ContentLength"] > 0
    head = s3api(s3, "head-object", "--key", "local/recent/snapshot.db")
    assert head["Metadata"]["name"] == second["name"] and head["Metadata"]["sha256"] == second["sha256"], head
    assert head["Metadata"]["verified"] == "true" and int(head["Metadata"]["revision"]) == second["revision"]
    state["s3"] = (first, second)


def test_restore_from_s3_picks_the_newest_or_the_named_version(local_cluster: Deployment, s3: dict[str, str]) -> None:
    dep = local_cluster
    first, second = state["s3"]
    for wanted, meta in ((None, second), (first["name"], first)):
        lose_every_members_data(dep)
        extra = ("--snapshot", wanted) if wanted else ()
        proc = etcd_restore(dep, "--bucket", f"s3://{BUCKET}/local", *extra, env=s3)
        assert proc.returncode == 0, proc.stderr
        report = json.loads(proc.stdout)
        assert (report["snapshot"], report["revision"], report["hashkv"]) == \
            (meta["name"], meta["revision"], meta["hashkv"]), report
        second_key = dep.etcdctl(dep.members[1], "get", "/s3/second", "--print-value-only").stdout.strip()
        assert second_key == (b"2" if meta is second else b""), f"restored {meta['name']}: /s3/second={second_key!r}"
        assert not list(Path(tempfile.gettempdir()).glob("kcp-restore-download-*")), "downloaded snapshot left behind"
