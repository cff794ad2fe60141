"""The parts of `kcp-host cloud-boot`, `cloud-refresh`, `etcd-install` and `kubelet-install` that run without a cloud.

The bundle unpacker on the real bundle format, the forwarding and routing commands (applied in a
throwaway network namespace where this machine allows one), and both clouds' classes against
stand-ins: a local HTTP server answering like the metadata server and GCS, and stand-in `gcloud`
and `aws` programs on PATH that log their arguments.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import functools
import gzip
import hashlib
import io
import os
import shutil
import ssl
import subprocess
import sys
import tarfile
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest

from components.render.boot import membership_units
from components.render.hostfiles import HostFile, bundle
from kcp_host import cli, cloudboot, clouds, install, lifecycle, reconcile, refresh, staticpods, systemd
from kcp_host.cloudboot import forward_rules, fstab_with_mount, unpack
from kcp_host.clouds import Aws, CloudError, Gce, retry, source_routes
from kcp_host.contract import (
    AGENT,
    DELTA_UNIT,
    DELTA_UNIT_FILE,
    MEMBERSHIP_TIMER_FILE,
    BackupEnv,
    BootEnv,
    ClusterEnv,
    SlotEnv,
    render_env,
)
from kcp_host.etcd import Member
from kcp_host.log import Abort

ROOT = Path(__file__).resolve().parents[2]
ENV = BootEnv(provider="gce", cluster="prod", roles=("etcd",), programs_secrets=("prod-host-programs",),
              disk="persistent", marker="gs://bucket/prod/cluster-formed", gce_project="proj",
              aws_region="eu-west-1")
AS_ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="owners other than oneself need root")


def _tar(*entries: tuple[tarfile.TarInfo, bytes]) -> str:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for info, data in entries:
            info.size = len(data) if info.isreg() else 0
            info.uname = info.uname or "root"
            info.gname = info.gname or "root"
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return base64.b64encode(gzip.compress(raw.getvalue())).decode()


def _entry(name: str, kind: bytes = tarfile.REGTYPE, link: str = "", owner: str = "root") -> tuple[tarfile.TarInfo,
                                                                                                  bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.uname, info.gname = kind, link, owner, owner
    return info, b"x"


@AS_ROOT
def test_a_bundle_unpacks_with_its_modes_and_owners_by_name(tmp_path: Path) -> None:
    files = [HostFile("/etc/etcd/etcd.env", "ETCD_NAME=h1\n"),
             HostFile("/etc/etcd/pki/server.key", "KEY\n", 0o600, "daemon"),
             HostFile("/usr/local/lib/kcp/kcp-host", b"#!/usr/bin/python3\n", 0o755)]
    written = unpack(bundle(files) + "\n", str(tmp_path))
    assert written == [tmp_path / f.path.lstrip("/") for f in sorted(files, key=lambda f: f.path)]
    for f in files:
        path = tmp_path / f.path.lstrip("/")
        data = f.content.encode() if isinstance(f.content, str) else f.content
        assert path.read_bytes() == data and path.stat().st_mode & 0o7777 == f.mode, f.path
        assert (path.owner(), path.group()) == (f.owner, f.owner), f.path


@pytest.mark.parametrize("bad", [
    _entry("../etc/passwd"), _entry("etc/../../passwd"), _entry("/etc/passwd"),
    _entry("etc/shadow-link", tarfile.SYMTYPE, "/etc/shadow"), _entry("etc/hard", tarfile.LNKTYPE, "etc/ok"),
    _entry("etc/folder", tarfile.DIRTYPE), _entry("dev/sda", tarfile.BLKTYPE),
    _entry("etc/file", owner="no-such-user-here")])
def test_the_unpacker_refuses_what_a_bundle_never_holds_and_writes_nothing(tmp_path: Path, bad) -> None:
    with pytest.raises(Abort):
        unpack(_tar(_entry("etc/ok"), bad), str(tmp_path / "root"))
    assert not (tmp_path / "root").exists(), "nothing may be written when one entry is refused"


@pytest.mark.parametrize("text", ["", "not base64!", base64.b64encode(b"not gzip").decode(),
                                  base64.b64encode(gzip.compress(b"not a tar", mtime=0)).decode()])
def test_what_is_not_a_bundle_is_a_cloud_error_to_retry(text: str, tmp_path: Path) -> None:
    with pytest.raises(CloudError):
        unpack(text, str(tmp_path))


def _netns() -> bool:
    return os.geteuid() == 0 and all(shutil.which(p) for p in ("unshare", "nft", "ip")) and subprocess.run(
        ["unshare", "-n", "nft", "list", "tables"], capture_output=True, check=False).returncode == 0


def test_forwarding_dnats_the_load_balancer_addresses_to_the_member_address() -> None:
    rules = forward_rules("10.0.0.5", ["10.0.0.100", "10.0.0.101"], ["2379", "2381"])
    rule = "ip daddr { 10.0.0.100, 10.0.0.101 } tcp dport { 2379, 2381 } dnat to 10.0.0.5;"
    assert rules.startswith("table ip kcp_forward\ndelete table ip kcp_forward\n"), "replaced as a whole"
    assert f"type nat hook prerouting priority dstnat; policy accept; {rule} }}" in rules
    assert f"type nat hook output priority -100; policy accept; {rule} }}" in rules


@pytest.mark.skipif(not _netns(), reason="needs root, nft, ip and a private network namespace")
def test_forwarding_applies_and_a_second_boot_replaces_it() -> None:
    """In a throwaway network namespace: the second apply leaves only its own rules."""
    code = ("from kcp_host.cloudboot import forward; forward('10.0.0.5', ['10.0.0.100'], ['2379']); "
            "forward('10.0.0.6', ['10.0.0.101'], ['2379', '6443'])")
    out = subprocess.run(["unshare", "-n", "sh", "-c", f"{sys.executable} -c \"{code}\" && nft list ruleset"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.count("dnat to 10.0.0.6") == 2 and "10.0.0.5" not in out, out


@pytest.mark.skipif(not _netns(), reason="needs root, ip and a private network namespace")
def test_aws_source_routes_apply_and_apply_again() -> None:
    """The member interface's commands, twice, in a throwaway namespace with two veth interfaces."""
    commands = source_routes("m1", "10.30.1.20", "10.30.1.0/24", "10.30.1.5", "p0", "10.30.0.0/16")
    script = "\n".join(["set -e", *(f"ip link add {i} type veth peer name {i}x && ip link set {i}x up"
                                     for i in ("p0", "m1")), "ip link set p0 up", "ip addr add 10.30.1.5/24 dev p0",
                        *(" ".join(c) + (" 2>/dev/null || true" if c[1:3] == ["rule", "del"] else "")
                          for c in commands * 2), "ip rule show", "ip route show table 101"])
    out = subprocess.run(["unshare", "-n", "sh", "-c", script], capture_output=True, text=True, check=True).stdout
    assert "100:\tfrom 10.30.1.5 lookup 100" in out and "101:\tfrom all lookup 101" in out, out
    assert "10.30.0.0/16 via 10.30.1.1 dev m1 src 10.30.1.20" in out, out


def test_fstab_gets_one_line_for_the_data_disk() -> None:
    old = "UUID=root / ext4 defaults 0 1\nUUID=old /var/lib/etcd ext4 defaults,nofail,noatime 0 2\n"
    assert fstab_with_mount(old, "new") == ("UUID=root / ext4 defaults 0 1\n"
                                            "UUID=new /var/lib/etcd ext4 defaults,nofail,noatime 0 2\n")


def test_retry_takes_the_first_answer_and_gives_up_after_its_attempts() -> None:
    answers = iter([CloudError("flaky"), None, False])

    def step() -> bool | None:
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    assert retry("ask", 3, 0, step) is False, "False is an answer; None and a CloudError are not"
    with pytest.raises(Abort, match="cannot ask twice"):
        retry("ask twice", 2, 0, lambda: None)


class _Server(BaseHTTPRequestHandler):
    """Answers from `routes` ((method, path) -> (status, body, required headers)); logs every request."""

    routes: ClassVar[dict[tuple[str, str], tuple[int, bytes, dict[str, str]]]] = {}
    seen: ClassVar[list[tuple[str, str, dict[str, str], bytes]]] = []

    def _answer(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.seen.append((self.command, self.path, dict(self.headers), body))
        status, data, required = self.routes.get((self.command, self.path), (404, b"", {}))
        if any(self.headers.get(k) != v for k, v in required.items()):
            status, data = 401, b""
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_PUT = do_POST = _answer

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[str]:
    _Server.routes, _Server.seen = {}, []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Server)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


GOOGLE = {"Metadata-Flavor": "Google"}
MARKER = "/storage/v1/b/bucket/o/prod%2Fcluster-formed"
UPLOAD = "/upload/storage/v1/b/bucket/o?uploadType=media&name=prod%2Fcluster-formed&ifGenerationMatch=0"


def _gce(server: str) -> Gce:
    _Server.routes |= {
        ("GET", "/v1/instance/attributes/kcp-slot"): (200, b"prod-etcd-0", GOOGLE),
        ("GET", "/v1/instance/service-accounts/default/token"): (200, b'{"access_token": "t0k"}', GOOGLE)}
    return Gce(ENV, metadata=f"{server}/v1", storage=server)


def test_gce_reads_its_slot_and_tells_a_missing_marker_from_an_error(server: str) -> None:
    gce = _gce(server)
    assert gce.slot() == "prod-etcd-0"
    for status, exists in ((200, True), (404, False)):
        _Server.routes[("GET", MARKER)] = (status, b"{}", {"Authorization": "Bearer t0k"})
        assert gce.marker_exists() is exists
    _Server.routes[("GET", MARKER)] = (503, b"", {})
    with pytest.raises(CloudError, match="HTTP 503"):
        gce.marker_exists()
    assert Gce(ENV, metadata=f"{server}/nowhere").network("prod-etcd-0") == []


@pytest.mark.parametrize(("status", "created"), [(200, True), (412, False)])
def test_gce_creates_the_marker_only_once_with_the_token_in_a_header(server: str, status: int,
                                                                      created: bool) -> None:
    _Server.routes[("POST", UPLOAD)] = (status, b"{}", {"Authorization": "Bearer t0k"})
    assert _gce(server).mark_formed() is created
    (method, path, headers, body) = _Server.seen[-1]
    assert (method, path, body, headers["Content-Type"]) == ("POST", UPLOAD, b"formed\n", "text/plain")


def test_aws_reads_metadata_only_with_an_imdsv2_token(server: str) -> None:
    _Server.routes |= {
        ("PUT", "/latest/api/token"): (200, b"imds-t0k", {"X-aws-ec2-metadata-token-ttl-seconds": "300"}),
        ("GET", "/latest/meta-data/tags/instance/kcp-slot"): (200, b"prod-etcd-1",
                                                               {"X-aws-ec2-metadata-token": "imds-t0k"})}
    assert Aws(ENV, imds=f"{server}/latest").slot() == "prod-etcd-1"
    assert [(m, p) for m, p, _, _ in _Server.seen] == [("PUT", "/latest/api/token"),
                                                       ("GET", "/latest/meta-data/tags/instance/kcp-slot")]


def _stand_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, cases: str) -> Path:
    """A program on PATH that logs its arguments to `calls` and answers by `case "$*" in {cases} esac`."""
    program = tmp_path / "bin" / name
    program.parent.mkdir(exist_ok=True)
    program.write_text(f'#!/usr/bin/env bash\necho "$*" >>"{tmp_path}/calls"\ncase "$*" in\n{cases}\nesac\n')
    program.chmod(0o755)
    monkeypatch.setenv("PATH", f"{program.parent}:{os.environ['PATH']}")
    return tmp_path / "calls"


def test_gce_reads_a_secret_through_gcloud_and_never_repeats_it_in_an_error(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    _stand_in(tmp_path, monkeypatch, "gcloud", """
*--secret=good*) printf 'BUNDLE' ;;
*) echo SECRET-ON-STDOUT; echo 'ERROR: (gcloud.secrets.versions.access) NOT_FOUND' >&2; exit 1 ;;""")
    gce = Gce(ENV)
    assert gce.secret("good") == "BUNDLE"
    with pytest.raises(CloudError, match="NOT_FOUND") as refused:
        gce.secret("bad")
    assert "SECRET" not in str(refused.value)


def test_aws_marker_and_secret_through_the_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _stand_in(tmp_path, monkeypatch, "aws", """
*head-object*) [[ -f $STATE/marker ]] || { echo 'An error occurred (404) when calling the HeadObject operation: Not Found' >&2; exit 254; } ;;
*put-object*) [[ ! -f $STATE/marker ]] || { echo 'An error occurred (PreconditionFailed) when calling the PutObject operation' >&2; exit 254; }; touch "$STATE/marker" ;;
*get-secret-value*) echo BUNDLE ;;""")  # noqa: E501
    monkeypatch.setenv("STATE", str(tmp_path))
    aws = Aws(BootEnv(**{**vars(ENV), "provider": "aws", "marker": "s3://bucket/prod/cluster-formed"}))
    assert aws.marker_exists() is False
    assert aws.mark_formed() is True and aws.mark_formed() is False, "create-only: the second one finds it"
    assert aws.marker_exists() is True
    assert aws.secret("prod-etcd-0") == "BUNDLE"
    logged = calls.read_text().splitlines()
    assert all(line.startswith("--region eu-west-1 ") for line in logged), logged
    assert logged[1].endswith("s3api put-object --bucket bucket --key prod/cluster-formed --if-none-match *")


def test_aws_attaches_the_slot_volume_once_its_old_instance_let_go(tmp_path: Path, server: str,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _stand_in(tmp_path, monkeypatch, "aws", """
*describe-volumes*) printf 'vol-0abc\\t%s\\n' "$(cat "$STATE/holder")" ;;
*attach-volume*) echo i-me >"$STATE/holder" ;;""")
    monkeypatch.setenv("STATE", str(tmp_path))
    (tmp_path / "holder").write_text("i-old\n")
    monkeypatch.setattr(clouds.time, "sleep", lambda _: (tmp_path / "holder").write_text("None\n")
                        if (tmp_path / "holder").read_text() == "i-old\n" else None)
    _Server.routes |= {("PUT", "/latest/api/token"): (200, b"t", {}),
                       ("GET", "/latest/meta-data/instance-id"): (200, b"i-me", {"X-aws-ec2-metadata-token": "t"})}
    aws = Aws(BootEnv(**{**vars(ENV), "provider": "aws"}), imds=f"{server}/latest")
    assert aws.data_disk("prod-etcd-0") == "/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_vol0abc"
    logged = calls.read_text()
    assert "Name=tag:kcp-cluster,Values=prod Name=tag:kcp-slot,Values=prod-etcd-0" in logged
    assert logged.count("attach-volume --device /dev/sdf --volume-id vol-0abc --instance-id i-me") == 1


def test_aws_member_routes_from_its_slot_interface(tmp_path: Path, server: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    _stand_in(tmp_path, monkeypatch, "aws", "*describe-network-interfaces*) printf 'eni-1\\t10.30.1.20\\t"
              "02:00:00:00:00:02\\ti-me\\n' ;;")
    imds = {"X-aws-ec2-metadata-token": "t"}
    _Server.routes |= {("PUT", "/latest/api/token"): (200, b"t", {}),
                       ("GET", "/latest/meta-data/instance-id"): (200, b"i-me", imds),
                       ("GET", "/latest/meta-data/local-ipv4"): (200, b"10.30.1.5", imds),
                       ("GET", "/latest/meta-data/network/interfaces/macs/02:00:00:00:00:02/subnet-ipv4-cidr-block"):
                           (200, b"10.30.1.0/24", imds)}
    monkeypatch.setattr(clouds, "interface_with_mac", lambda mac: {"02:00:00:00:00:02": "ens6"}.get(mac))
    commands: list[list[str]] = []
    real_run = subprocess.run

    def run(argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        if argv[0] != "ip":
            return real_run(argv, **kwargs)
        commands.append(argv)
        return subprocess.CompletedProcess(argv, 0, "2: ens5    inet 10.30.1.5/24 brd 10.30.1.255\n", "")

    monkeypatch.setattr(clouds.subprocess, "run", run)
    aws = Aws(BootEnv(**{**vars(ENV), "provider": "aws", "vpc_cidr": "10.30.0.0/16"}), imds=f"{server}/latest")
    assert aws.network("prod-etcd-0") == ["10.30.1.5"], "the NLB sends to the primary address"
    assert commands[0] == ["ip", "-o", "-4", "addr", "show", "to", "10.30.1.5"]
    assert commands[1:] == source_routes("ens6", "10.30.1.20", "10.30.1.0/24", "10.30.1.5", "ens5", "10.30.0.0/16")


def test_aws_refuses_a_slot_without_a_tagged_volume(tmp_path: Path, server: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    _stand_in(tmp_path, monkeypatch, "aws", "*describe-volumes*) echo None ;;")
    _Server.routes |= {("PUT", "/latest/api/token"): (200, b"t", {}),
                       ("GET", "/latest/meta-data/instance-id"): (200, b"i-me", {"X-aws-ec2-metadata-token": "t"})}
    with pytest.raises(Abort, match="no EBS volume tagged for slot prod-etcd-0"):
        Aws(BootEnv(**{**vars(ENV), "provider": "aws"}), imds=f"{server}/latest").data_disk("prod-etcd-0")


def test_both_clouds_have_the_same_methods_in_the_same_order() -> None:
    def methods(cls: type) -> list[str]:
        return [name for name, value in vars(cls).items() if callable(value) and not name.startswith("_")]

    assert methods(Gce) == methods(Aws)


def test_cloud_boot_refuses_an_unknown_provider(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    env = tmp_path / "boot.env"
    env.write_text(render_env(BootEnv(**{**vars(ENV), "provider": "azure"}), "test"))
    monkeypatch.setenv(BootEnv.OVERRIDE, str(env))
    assert cli.main(["cloud-boot"]) == 2
    assert "unknown provider 'azure'" in capsys.readouterr().err


def test_an_api_server_boot_places_its_files_before_kubelet_install_starts_the_units(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The units and the kubelet config come in the slot's bundle: it is unpacked first."""
    steps: list[str] = []

    class Cloud:
        def __init__(self, env: BootEnv) -> None:
            pass

        def slot(self) -> str:
            return "prod-api"

        def secret(self, name: str) -> str:
            return f"bundle {name}"

        def network(self, slot: str) -> list[str]:
            return []

    env, releases = tmp_path / "boot.env", tmp_path / "slot.env"  # slot.env: what the bundle brought
    env.write_text(render_env(BootEnv(**{**vars(ENV), "roles": ("apiserver",)}), "test"))
    releases.write_text(render_env(SlotEnv("prod-api", ("release", "3.5.33", "-"), ("1.36.4",)), "test"))
    monkeypatch.setenv(BootEnv.OVERRIDE, str(env))
    monkeypatch.setenv(SlotEnv.OVERRIDE, str(releases))
    monkeypatch.setitem(cloudboot.CLOUDS, "gce", Cloud)
    monkeypatch.setattr(cloudboot, "unpack_slot", lambda text: steps.append(f"unpack {text}") or [])
    monkeypatch.setattr(install, "etcd", lambda argv: steps.append(f"etcd-install {' '.join(argv)}") or 0)
    monkeypatch.setattr(install, "kubelet", lambda argv: steps.append(f"kubelet-install {' '.join(argv)}") or 0)
    assert cli.main(["cloud-boot"]) == 0
    assert steps == ["unpack bundle prod-api", "etcd-install release 3.5.33 -", "kubelet-install 1.36.4"]


@pytest.mark.parametrize(("marked_for", "restarts"), [(0, 0), (2, 2)], ids=["slow-start", "marked-removed"])
def test_boot_starts_etcd_again_while_it_stays_stopped_as_no_member(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, marked_for: int, restarts: int) -> None:
    """A slot added again after a shrink: its old member's mark is cleared only by a staying member's refresh, and
    until then etcd-member-recovery keeps etcd stopped; boot starts it again instead of waiting out its time."""
    cluster = ClusterEnv(cluster_name="prod", member_name="prod-etcd-3", peer_url="https://10.0.0.5:2380",
                         client_url="https://10.0.0.5:2379", members=(), client_endpoints=(), etcd_ca="ca",
                         etcd_cert="crt", etcd_key="key", data_dir="data", state_dir=str(tmp_path))
    stopped, steps, waits = Path(cluster.not_a_member_file), [], iter(range(5))

    def await_healthy(env: ClusterEnv, ctl: object, timeout: float) -> None:
        attempt = next(waits)
        if attempt < marked_for:
            stopped.write_text("the stack no longer lists prod-etcd-3 (marked removed by etcd-reconcile-members)\n")
        elif attempt < 3:
            stopped.unlink(missing_ok=True)  # started: etcd-member-recovery removes the file
        if attempt != 3:
            raise Abort(1, "etcd not healthy after 30s")

    monkeypatch.setattr(cloudboot, "await_healthy", await_healthy)
    monkeypatch.setattr(systemd, "act", lambda *args: steps.append(" ".join(args)))
    cloudboot.await_member(cluster, 900)
    assert steps == ["start --no-block etcd.service"] * restarts
    stopped.write_text("marked removed\n")
    with pytest.raises(Abort, match="etcd not healthy"):  # out of time: the boot fails as before, nothing started
        cloudboot.await_member(cluster, 0)
    assert steps == ["start --no-block etcd.service"] * restarts


PINS = ["1.36.4", "a" * 64, "2.3.4", "b" * 64, "1.4.3", "c" * 64, "1.36.0", "d" * 64]


def test_kubelet_install_refuses_an_unpinned_release_before_any_download(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["kubelet-install", PINS[0], "-", *PINS[2:]]) == 2
    assert "not a sha256: KUBELET_SHA256" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        install.kubelet(PINS[:7])


def test_kubelet_install_installs_pinned_binaries_writes_nothing_else_and_restarts_what_it_upgraded(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Against stand-ins: the kubelet reports an old version, the rest the pinned ones; systemctl logs its calls. The
    running kubelet is restarted onto its new binary (try-restart: a first install starts it once, by enable)."""
    calls = _stand_in(tmp_path, monkeypatch, "systemctl", "*) ;;")
    reported = {"kubelet": "1.35.0", "containerd": "2.3.4", "runc": "1.4.3", "crictl": "1.36.0"}
    monkeypatch.setattr(install, "version_of", lambda argv, pattern: reported[Path(argv[0]).name])
    monkeypatch.setattr(install, "write_atomic", lambda *args: pytest.fail(f"kubelet-install wrote {args[0]}"))
    fetched: list[tuple[str, str, Path]] = []
    monkeypatch.setattr(install, "install_release", lambda url, sha256, dest: fetched.append((url, sha256, dest)))
    monkeypatch.setattr(install.platform, "machine", lambda: "x86_64")
    assert install.kubelet(PINS) == 0
    assert fetched == [("https://dl.k8s.io/release/v1.36.4/bin/linux/amd64/kubelet", "a" * 64,
                        Path("/usr/local/bin/kubelet"))]
    assert calls.read_text().splitlines() == ["daemon-reload", "try-restart kubelet", "enable --now containerd kubelet"]
    calls.write_text("")  # the same release again: nothing downloaded, nothing restarted
    reported["kubelet"] = "1.36.4"
    assert install.kubelet(PINS) == 0
    assert len(fetched) == 1
    assert calls.read_text().splitlines() == ["daemon-reload", "enable --now containerd kubelet"]
    source = Path(install.__file__).read_text()
    assert "[Unit]" not in source and "/etc/systemd" not in source, "units are host files, from the renderer"


def _release(tmp_path: Path) -> tuple[str, str]:
    archive = tmp_path / "release.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name in ("etcd-v1/etcd", "../../escape", "etcd-v1/README.md", "etcd-v1/etcdctl"):
            info = tarfile.TarInfo(name)
            info.size = 2
            tar.addfile(info, io.BytesIO(b"#!"))
        folder = tarfile.TarInfo("etcd-v1/docs")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
    return archive.as_uri(), hashlib.sha256(archive.read_bytes()).hexdigest()


def test_release_archives_install_base_names_only(tmp_path: Path) -> None:
    url, sha256 = _release(tmp_path)
    install.install_release(url, sha256, tmp_path / "all")
    assert sorted(p.name for p in (tmp_path / "all").iterdir()) == ["README.md", "escape", "etcd", "etcdctl"]
    assert not (tmp_path.parent / "escape").exists()
    assert all(p.stat().st_mode & 0o777 == 0o755 for p in (tmp_path / "all").iterdir())
    install.install_release(url, sha256, tmp_path / "some", ("etcd", "etcdctl", "etcdutl"))
    assert sorted(p.name for p in (tmp_path / "some").iterdir()) == ["etcd", "etcdctl"]


def test_a_download_that_is_not_the_pinned_one_is_refused_and_nothing_written(tmp_path: Path) -> None:
    url = _release(tmp_path)[0]
    with pytest.raises(Abort, match="checksum mismatch"):
        install.install_release(url, "0" * 64, tmp_path / "dest")
    assert not (tmp_path / "dest").exists()
    binary = tmp_path / "runc.amd64"
    binary.write_bytes(b"\x7fELF")
    install.install_release(binary.as_uri(), hashlib.sha256(b"\x7fELF").hexdigest(), tmp_path / "sbin" / "runc")
    assert (tmp_path / "sbin" / "runc").read_bytes() == b"\x7fELF"


def test_interfaces_are_found_by_mac(tmp_path: Path) -> None:
    for name, mac in (("ens5", "02:00:00:00:00:01"), ("ens6", "02:00:00:00:00:02")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "address").write_text(mac + "\n")
    assert clouds.interface_with_mac("02:00:00:00:00:02", str(tmp_path)) == "ens6"
    assert clouds.interface_with_mac("02:00:00:00:00:03", str(tmp_path)) is None


# ----- cloud-refresh -------------------------------------------------------------------------------------------------

@AS_ROOT
def test_a_bundle_unpacked_again_changes_only_what_differs(tmp_path: Path) -> None:
    files = [HostFile("/etc/etcd/etcd.env", "ETCD_NAME=h1\n"), HostFile("/etc/etcd/pki/server.key", "KEY\n", 0o600)]
    unpack(bundle(files), str(tmp_path))
    assert unpack(bundle(files), str(tmp_path)) == [], "the same bundle again"
    assert unpack(bundle([files[0], HostFile(files[1].path, "KEY\n", 0o640)]), str(tmp_path)) == [
        tmp_path / "etc/etcd/pki/server.key"], "a mode is a change"
    assert unpack(bundle([HostFile(files[0].path, "ETCD_NAME=h2\n")]), str(tmp_path)) == [
        tmp_path / "etc/etcd/etcd.env"]


class Refresh:
    """A cloud machine for `cloud-refresh`: the boot.env, slot.env and cluster.env boot left, bundles in a stand-in
    secret store, every file under `root`; the lock, etcd, installs and systemd record their steps instead."""

    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, roles: tuple[str, ...]) -> None:
        self.tmp, self.root, self.roles = tmp_path, tmp_path / "root", roles
        self.steps: list[str] = []
        self.reads: list[str] = []  # secrets read, in order
        self.silent: set[str] = set()  # client URLs that fail the stand-in etcdctl's health check
        self.secrets = {"prod-host-programs": bundle([HostFile(AGENT, b"agent 1", 0o755)])}
        self.slot, self.learner, self.installed = ("prod-etcd-0" if "etcd" in roles else "prod-api"), False, "3.5.33"
        (tmp_path / "boot.env").write_text(render_env(BootEnv(**{**vars(ENV), "roles": roles}), "test"))
        # etcd's member list as the stand-in etcdctl answers it: no member with this machine's peer URL yet
        self.listed = [Member(1, "prod-etcd-1", ("https://10.0.0.3:2380",), ("https://10.0.0.3:2379",), False)]
        (tmp_path / "cluster.env").write_text(self.cluster_env(("prod-etcd-0=https://10.0.0.2:2380",)))
        monkeypatch.setenv(BootEnv.OVERRIDE, str(tmp_path / "boot.env"))
        monkeypatch.setenv(ClusterEnv.OVERRIDE, str(tmp_path / "cluster.env"))
        monkeypatch.setenv(SlotEnv.OVERRIDE, str(self.root / SlotEnv.PATH.lstrip("/")))
        self.publish()
        unpack(self.secrets["prod-host-programs"], str(self.root))  # what boot placed and started on
        cloudboot.unpack_slot(self.secrets[self.slot], str(self.root))
        (tmp_path / "started").write_text(self.etcd_env())
        self._stand_ins(monkeypatch)

    def etcd_env(self) -> str:
        return (self.root / "etc/etcd/etcd.env").read_text()

    def cluster_env(self, members: tuple[str, ...]) -> str:
        return render_env(ClusterEnv(
            cluster_name="prod", member_name="prod-etcd-0", peer_url="https://10.0.0.2:2380",
            client_url="https://10.0.0.2:2379", members=members,
            client_endpoints=tuple(m.split("=")[1].replace(":2380", ":2379") for m in members), etcd_ca="ca",
            etcd_cert="crt", etcd_key="key", data_dir="data", started_config_file=str(self.tmp / "started")), "test")

    def publish(self, version: str = "3.5.33", election: str = "1000", kube: str = "v1",
                members: tuple[str, ...] = ("prod-etcd-0=https://10.0.0.2:2380",), extra: tuple[HostFile, ...] = (),
                ) -> None:
        """A `pulumi up`: new bundles in the secret store (a member's with a cluster.env listing `members`)."""
        api, member = "apiserver" in self.roles, "etcd" in self.roles
        slot = SlotEnv(self.slot, ("release", version, "-"), kubelet_install=("1.36.4",) if api else (),
                       etcd_endpoints=() if member else ("https://10.0.0.2:2379",),
                       etcd_client=() if member else ("ca", "crt", "key"))
        files = [HostFile(SlotEnv.PATH, render_env(slot, "test")),
                 HostFile("/etc/etcd/etcd.env", f"ETCD_ELECTION_TIMEOUT={election}\n")]
        if member:
            files.append(HostFile(ClusterEnv.PATH, self.cluster_env(members)))
        files += extra
        self.secrets[self.slot] = bundle(files + ([HostFile("/etc/kubernetes/pki/apiserver.crt", kube)] if api else []))

    def rolling_restart(self, argv: list[str]) -> int:
        """etcd-rolling-restart's decision: a restart only when what etcd reads differs from what it started with."""
        started = self.tmp / "started"
        if started.is_file() and started.read_text() == self.etcd_env():
            self.steps.append("etcd unchanged")
        else:
            self.steps.append("etcd restart")
            started.write_text(self.etcd_env())
        return 0

    def _stand_ins(self, monkeypatch: pytest.MonkeyPatch) -> None:
        machine, steps = self, self.steps

        class Cloud:
            def __init__(self, env: BootEnv) -> None:
                pass

            def secret(self, name: str) -> str:
                machine.reads.append(name)
                return machine.secrets[name]

        @contextlib.contextmanager
        def lock(env: ClusterEnv, ctl: object, endpoints: list[str]) -> Iterator[None]:
            steps.append(f"lock (waits {env.lock_wait_seconds}s)")
            try:
                yield
            finally:
                steps.append("unlock")

        def record(step: str) -> Callable[..., int]:
            return lambda *args, **kwargs: steps.append(step) or 0

        def exec_agent(path: str, argv: list[str]) -> None:
            raise SystemExit(f"exec {' '.join(argv)}")

        monkeypatch.setitem(cloudboot.CLOUDS, "gce", Cloud)
        monkeypatch.setattr(cloudboot, "unpack", functools.partial(unpack, root=str(self.root)))
        monkeypatch.setattr(cloudboot, "unpack_slot", functools.partial(cloudboot.unpack_slot, root=str(self.root)))
        monkeypatch.setattr(cloudboot, "DELTA_UNIT_FILE", str(self.root / DELTA_UNIT_FILE.lstrip("/")))
        monkeypatch.setattr(cloudboot, "MEMBERSHIP_TIMER_FILE", str(self.root / MEMBERSHIP_TIMER_FILE.lstrip("/")))
        monkeypatch.setattr(refresh.Etcdctl, "healthy",
                            lambda ctl, endpoints, **timeouts: not set(endpoints) & self.silent)
        monkeypatch.setattr(refresh, "replacement_lock", lock)
        monkeypatch.setattr(refresh, "REFRESH_APPLIED", str(self.tmp / "applied"))
        monkeypatch.setattr(refresh, "STATIC_PODS_STARTED", str(self.tmp / "pods-started"))
        monkeypatch.setattr(staticpods, "KUBELET_READS", (str(self.root / "etc/kubernetes"),))
        monkeypatch.setattr(refresh.os, "execv", exec_agent)
        monkeypatch.setattr(refresh.Etcdctl, "members", lambda ctl, endpoints: [
            dataclasses.replace(m, learner=self.learner) for m in self.listed])
        monkeypatch.setattr(refresh.reconcile, "follow", lambda env, wanted: steps.append(
            f"follow membership: {','.join(sorted(wanted))}"))
        monkeypatch.setattr(lifecycle, "await_voters_healthy", record("voters healthy"))
        monkeypatch.setattr(lifecycle, "rolling_restart", self.rolling_restart)
        monkeypatch.setattr(install, "version_of", lambda argv, pattern: self.installed)
        monkeypatch.setattr(install, "etcd", lambda argv: steps.append(f"etcd-install {argv[1]}") or 0)
        monkeypatch.setattr(install, "kubelet", record("kubelet-install"))
        monkeypatch.setattr(systemd, "act", lambda *args: steps.append(f"systemctl {' '.join(args)}"))
        monkeypatch.setattr(refresh, "restart_static_pods", record("static pods restart"))
        monkeypatch.setattr(refresh, "await_readyz", record("readyz"))

    def run(self, *args: str) -> int:
        self.steps.clear()
        self.reads.clear()
        return cli.main(["cloud-refresh", *args])


def test_refresh_applies_a_new_bundle_under_the_lock_and_a_second_run_changes_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    machine = Refresh(tmp_path, monkeypatch, ("etcd",))
    assert machine.run() == 0 and machine.steps[0] == "lock (waits 300s)", "the same bundles as boot: still checked"
    assert "etcd unchanged" in machine.steps
    machine.publish(election="1200")
    assert machine.run() == 0
    assert machine.steps == ["lock (waits 300s)", "voters healthy", "systemctl daemon-reload", "etcd-install 3.5.33",
                             "etcd restart", "unlock"]
    assert (machine.root / "etc/etcd/etcd.env").read_text() == "ETCD_ELECTION_TIMEOUT=1200\n"
    assert machine.run() == 0 and machine.steps == [], "applied: no lock, nothing touched"


FIVE = tuple(f"prod-etcd-{i}=https://10.0.0.{i + 2}:2380" for i in range(5))


def test_a_member_removes_the_members_its_new_bundle_drops_before_the_health_gate(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """5 -> 3 on a cloud: the dropped slots' groups are deleted; their members must leave etcd, or the health gate
    fails on them forever and 3 of 5 voters tolerate no failure."""
    machine = Refresh(tmp_path, monkeypatch, ("etcd",))
    machine.listed = [Member(i + 1, f"prod-etcd-{i}", (f"https://10.0.0.{i + 2}:2380",), (), False) for i in range(5)]
    machine.publish(members=FIVE[:3])
    assert machine.run() == 0
    assert machine.steps[:3] == ["lock (waits 300s)", "follow membership: prod-etcd-0,prod-etcd-1,prod-etcd-2",
                                 "voters healthy"], machine.steps


@pytest.mark.parametrize("members", [(), ("prod-etcd-1=https://10.0.0.3:2380",)], ids=["none", "not-this-one"])
def test_a_bundle_that_does_not_list_this_member_removes_nobody(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, members: tuple[str, ...]) -> None:
    """Every member the list lacks would be removed: a list without this member is refused before anything runs."""
    machine = Refresh(tmp_path, monkeypatch, ("etcd",))
    machine.listed = [Member(i + 1, f"prod-etcd-{i}", (f"https://10.0.0.{i + 2}:2380",), (), False) for i in range(3)]
    machine.publish(election="1200", members=members)
    assert machine.run() != 0
    assert machine.steps == ["lock (waits 300s)", "unlock"], machine.steps
    assert not (tmp_path / "applied").exists()


def test_reconcile_refuses_an_empty_member_list_before_it_asks_etcd() -> None:
    env = ClusterEnv(cluster_name="prod", member_name="prod-etcd-0", peer_url="https://10.0.0.2:2380",
                     client_url="https://10.0.0.2:2379", members=(), client_endpoints=(), etcd_ca="ca",
                     etcd_cert="crt", etcd_key="key", data_dir="data", etcdctl="/nonexistent/etcdctl")
    with pytest.raises(Abort, match="no members given: nothing removed"):
        reconcile.follow(env, {})


def test_a_machine_that_is_no_member_leaves_the_membership_to_the_members(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A dropped slot's machine (its bundle is never updated, it still lists every member) or one not yet joined."""
    machine = Refresh(tmp_path, monkeypatch, ("etcd",))
    machine.publish(election="1200", members=FIVE)
    assert machine.run() == 0
    assert not [step for step in machine.steps if step.startswith("follow")], machine.steps


def test_the_slots_bundle_is_read_again_once_the_lock_is_held(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The wait for the lock may outlast a `pulumi up`: what is applied (and its membership) is the newest bundle."""
    machine = Refresh(tmp_path, monkeypatch, ("etcd",))
    machine.publish(election="1200")
    held = refresh.replacement_lock

    @contextlib.contextmanager
    def lock_during_an_up(env: ClusterEnv, ctl: object, endpoints: list[str]) -> Iterator[None]:
        machine.publish(election="1400")
        with held(env, ctl, endpoints):
            yield

    monkeypatch.setattr(refresh, "replacement_lock", lock_during_an_up)
    assert machine.run() == 0
    assert machine.etcd_env() == "ETCD_ELECTION_TIMEOUT=1400\n"
    assert machine.run() == 0 and machine.steps == [], "the newest bundle is recorded as applied"


def test_a_file_the_new_bundle_lacks_is_removed_and_its_unit_stopped_first(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """backup.deltaSeconds turned off on a cloud: the delta log's unit leaves the bundle, so it must leave the
    machine, or the refresh would go on restarting the archiver. A file no bundle placed is not the refresh's."""
    machine = Refresh(tmp_path, monkeypatch, ("etcd",))
    unit = HostFile(DELTA_UNIT_FILE, "[Service]\nExecStart=/bin/true\n")
    machine.publish(extra=(unit,))
    assert machine.run() == 0 and (machine.root / DELTA_UNIT_FILE.lstrip("/")).is_file()
    assert f"systemctl restart --no-block {DELTA_UNIT}" in machine.steps
    own = machine.root / "etc/etcd/an-operators-note"
    own.write_text("mine\n")
    machine.publish()
    assert machine.run() == 0
    assert not (machine.root / DELTA_UNIT_FILE.lstrip("/")).exists() and own.read_text() == "mine\n"
    assert machine.steps[machine.steps.index(f"systemctl disable --now {DELTA_UNIT}") + 1] == "systemctl daemon-reload"
    assert not [step for step in machine.steps if "restart --no-block" in step], machine.steps


def test_a_new_etcd_release_is_installed_and_restarts_etcd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    machine = Refresh(tmp_path, monkeypatch, ("etcd",))
    machine.publish(version="3.5.34")  # etcd's configuration stays the same
    assert machine.run() == 0
    assert machine.steps[-3:] == ["etcd-install 3.5.34", "etcd restart", "unlock"], "a new binary is a change"


def test_a_failed_refresh_records_nothing_and_the_next_run_tries_again(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    machine = Refresh(tmp_path, monkeypatch, ("etcd",))
    machine.publish(election="1200")

    def unhealthy(argv: list[str]) -> int:
        raise Abort(1, "voters not healthy after 120s: prod-etcd-0")

    monkeypatch.setattr(lifecycle, "rolling_restart", unhealthy)
    assert machine.run() == 1 and machine.steps[-1] == "unlock"
    assert not (tmp_path / "applied").exists()
    machine.learner = True
    assert machine.run() == 5, "a joining member: not now"
    assert machine.steps == ["lock (waits 300s)", "voters healthy", "unlock"]


def test_a_new_agent_build_is_unpacked_restarts_the_services_on_the_old_one_and_applies_the_rest(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    machine = Refresh(tmp_path, monkeypatch, ("etcd",))
    monkeypatch.setattr(systemd, "is_active", lambda unit: unit == DELTA_UNIT)  # the metrics server is not running
    machine.secrets["prod-host-programs"] = bundle([HostFile(AGENT, b"agent 2", 0o755)])
    with pytest.raises(SystemExit, match=f"exec {AGENT} cloud-refresh"):
        machine.run()
    assert (machine.root / AGENT.lstrip("/")).read_bytes() == b"agent 2"
    assert machine.steps == [f"systemctl restart {DELTA_UNIT}"]
    assert machine.run() == 0 and f"systemctl restart {DELTA_UNIT}" not in machine.steps, "the same build again"


def test_an_api_server_restarts_its_static_pods_only_when_their_files_change(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    machine = Refresh(tmp_path, monkeypatch, ("apiserver",))
    assert machine.run() == 0
    assert machine.steps == ["lock (waits 300s)", "etcd-install 3.5.33", "unlock"], "boot's files: no restart"
    machine.publish(election="1200")  # not a file the static pods read
    assert machine.run() == 0 and "static pods restart" not in machine.steps
    machine.publish(election="1200", kube="v2")
    assert machine.run() == 0
    assert machine.steps[-5:] == ["etcd-install 3.5.33", "kubelet-install", "static pods restart", "readyz", "unlock"]


def test_static_pods_are_removed_while_the_kubelet_is_stopped_and_created_anew(tmp_path: Path,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _stand_in(tmp_path, monkeypatch, "systemctl", "*) ;;")
    _stand_in(tmp_path, monkeypatch, "crictl", "*'pods -q --namespace kube-system') printf 'p1\\np2\\n' ;;\n*) ;;")
    staticpods.restart_static_pods()
    crictl = " ".join(staticpods.CRICTL[1:])
    assert calls.read_text().splitlines() == ["stop kubelet", f"{crictl} pods -q --namespace kube-system",
                                              f"{crictl} rmp --force p1 p2", "restart containerd", "start kubelet"]


class _Readyz(BaseHTTPRequestHandler):
    answers: ClassVar[list[int]] = []

    def do_GET(self) -> None:
        self.send_response(self.answers.pop(0) if self.answers else 200 if self.path == "/readyz" else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_readyz_is_awaited_on_the_node_over_https(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The serving certificate names no node address (here: a throwaway self-signed one); only the status counts."""
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-keyout", str(tmp_path / "key"), "-out", str(tmp_path / "crt"), "-subj", "/CN=elsewhere",
                    "-days", "1"], capture_output=True, check=True)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "crt", tmp_path / "key")
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Readyz)
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    monkeypatch.setattr(staticpods, "API_PORT", httpd.server_address[1])
    monkeypatch.setattr(staticpods.time, "sleep", lambda _: None)
    try:
        _Readyz.answers = [500, 500]
        staticpods.await_readyz("127.0.0.1", 60)
        assert _Readyz.answers == [], "not ready twice, then ready"
        _Readyz.answers = [500] * 3
        with pytest.raises(Abort, match="readyz not ready after 0s"):
            staticpods.await_readyz("127.0.0.1", 0)
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_a_refresh_restarts_the_delta_log_archiver_only_when_what_it_reads_changed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """It reads cluster.env and backup.env once, as it starts: a bundle that changes either restarts it (a chain
    resumes where it ends); one that changes only etcd's settings starts it if it is stopped and leaves it running
    otherwise (etcd's restart ends its watch, which it resumes); without its unit (backup.deltaSeconds unset)
    nothing is started."""
    machine = Refresh(tmp_path, monkeypatch, ("etcd",))
    unit = machine.root / DELTA_UNIT_FILE.lstrip("/")
    monkeypatch.setattr(cloudboot, "DELTA_UNIT_FILE", str(unit))
    machine.publish(election="1200")
    assert machine.run() == 0 and not [s for s in machine.steps if DELTA_UNIT in s]
    unit.parent.mkdir(parents=True, exist_ok=True)
    unit.write_text("[Service]\n")
    machine.publish(election="1300")
    assert machine.run() == 0
    assert machine.steps[-4:] == ["etcd restart", f"systemctl enable {DELTA_UNIT}",
                                  f"systemctl start --no-block {DELTA_UNIT}", "unlock"], machine.steps
    backup_env = HostFile(BackupEnv.PATH, "KCP_BACKUP_DEST=ssh://etcd-backup@10.0.0.9/srv/etcd-backups/prod\n")
    machine.publish(election="1300", extra=(backup_env,))  # a new destination
    assert machine.run() == 0
    assert machine.steps[-4:-1] == ["etcd unchanged", f"systemctl enable {DELTA_UNIT}",
                                    f"systemctl restart --no-block {DELTA_UNIT}"], machine.steps
    machine.publish(election="1300", extra=(backup_env,), members=FIVE[:2])  # cluster.env: a member joined
    assert machine.run() == 0
    assert machine.steps[-4:-1] == ["etcd unchanged", f"systemctl enable {DELTA_UNIT}",
                                    f"systemctl restart --no-block {DELTA_UNIT}"], machine.steps


def five_listed(machine: Refresh) -> None:
    machine.listed = [Member(i + 1, f"prod-etcd-{i}", (f"https://10.0.0.{i + 2}:2380",),
                             (f"https://10.0.0.{i + 2}:2379",), False) for i in range(5)]


def test_while_every_voter_answers_the_membership_watch_reads_no_secret_and_takes_no_lock(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    machine = Refresh(tmp_path, monkeypatch, ("etcd",))
    five_listed(machine)
    machine.publish(members=FIVE[:3])
    assert machine.run("--membership") == 0
    assert (machine.reads, machine.steps) == ([], [])


def test_silent_voters_the_bundle_dropped_leave_at_once_and_nothing_else_is_applied(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """5 -> 3: the up deleted the dropped slots' machines; the watch removes their members under the lock within a
    minute, and leaves the rest of the new bundle to the refresh."""
    machine = Refresh(tmp_path, monkeypatch, ("etcd",))
    five_listed(machine)
    machine.silent = {"https://10.0.0.5:2379", "https://10.0.0.6:2379"}
    machine.publish(election="1200", members=FIVE[:3])
    assert machine.run("--membership") == 0
    assert machine.steps == ["lock (waits 300s)", "follow membership: prod-etcd-0,prod-etcd-1,prod-etcd-2",
                             "unlock"], machine.steps
    assert machine.reads == ["prod-etcd-0", "prod-etcd-0"], "the bundle read again under the lock"
    assert machine.etcd_env() != "ETCD_ELECTION_TIMEOUT=1200\n" and not (tmp_path / "applied").exists()


def test_a_silent_voter_the_bundle_still_lists_is_left_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A member down for any other reason (its machine being healed) stays a member: no lock, nothing removed."""
    machine = Refresh(tmp_path, monkeypatch, ("etcd",))
    five_listed(machine)
    machine.silent = {"https://10.0.0.6:2379"}
    machine.publish(members=FIVE)
    assert machine.run("--membership") == 0
    assert (machine.reads, machine.steps) == (["prod-etcd-0"], [])


def test_a_refresh_starts_the_membership_watch_where_the_bundle_has_it(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Running machines get the watch by refresh: the bundle places its units and the refresh enables the timer."""
    machine = Refresh(tmp_path, monkeypatch, ("etcd",))
    machine.publish(election="1200")
    assert machine.run() == 0 and not [s for s in machine.steps if "membership" in s]
    machine.publish(election="1200", extra=tuple(HostFile(path, unit) for path, unit in membership_units().items()))
    assert machine.run() == 0
    assert machine.steps[-2:] == ["systemctl enable --now kcp-cloud-membership.timer", "unlock"], machine.steps
