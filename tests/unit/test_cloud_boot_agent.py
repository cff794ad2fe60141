"""The parts of `kcp-host cloud-boot` and `kubelet-install` that run without a cloud.

The bundle unpacker on the real bundle format, the forwarding and routing commands (applied in a
throwaway network namespace where this machine allows one), and both clouds' classes against
stand-ins: a local HTTP server answering like the metadata server and GCS, and stand-in `gcloud`
and `aws` programs on PATH that log their arguments.
"""

from __future__ import annotations

import base64
import gzip
import io
import os
import shutil
import subprocess
import sys
import tarfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest

from components.render.hostfiles import HostFile, bundle
from kcp_host import cli, clouds, install
from kcp_host.cloudboot import forward_rules, fstab_with_mount, unpack
from kcp_host.clouds import Aws, CloudError, Gce, retry, source_routes
from kcp_host.contract import BootEnv, render_env
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
                                  base64.b64encode(gzip.compress(b"not a tar")).decode()])
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
    gce.prepare()
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
    aws.prepare()
    assert aws.marker_exists() is False
    assert aws.mark_formed() is True and aws.mark_formed() is False, "create-only: the second one finds it"
    assert aws.marker_exists() is True
    assert aws.secret("prod-etcd-0") == "BUNDLE"
    logged = calls.read_text().splitlines()
    assert all(line.startswith("--region eu-west-1 ") for line in logged), logged
    assert "s3api put-object --bucket bucket --key prod/cluster-formed --if-none-match * --body" in logged[1]


def test_aws_attaches_the_slot_volume_once_its_old_instance_let_go(tmp_path: Path, server: str,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _stand_in(tmp_path, monkeypatch, "aws", """
*describe-volumes\\ --filters*) echo vol-0abc ;;
*describe-volumes\\ --volume-ids*) cat "$STATE/holder" ;;
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
    assert logged.count("attach-volume --volume-id vol-0abc --device /dev/sdf --instance-id i-me") == 1


def test_cloud_boot_refuses_an_unknown_provider(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    env = tmp_path / "boot.env"
    env.write_text(render_env(BootEnv(**{**vars(ENV), "provider": "azure"}), "test"))
    monkeypatch.setenv(BootEnv.OVERRIDE, str(env))
    assert cli.main(["cloud-boot"]) == 2
    assert "unknown provider 'azure'" in capsys.readouterr().err


def test_kubelet_install_refuses_an_unpinned_release_before_any_download(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["1.35.8", "-", "2.1.4", "a" * 64, "1.3.0", "b" * 64, "1.35.0", "c" * 64]
    assert cli.main(["kubelet-install", *args]) == 2
    assert "not a sha256: KUBELET_SHA256" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        install.kubelet(args[:7])


def test_release_archives_install_base_names_only(tmp_path: Path) -> None:
    archive = tmp_path / "release.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name in ("bin/containerd", "../../escape", "bin/ctr"):
            info = tarfile.TarInfo(name)
            info.size = 2
            tar.addfile(info, io.BytesIO(b"#!"))
    install.install_from_tar(archive, tmp_path / "dest")
    assert sorted(p.name for p in (tmp_path / "dest").iterdir()) == ["containerd", "ctr", "escape"]
    assert not (tmp_path.parent / "escape").exists()
    assert all((tmp_path / "dest" / n).stat().st_mode & 0o777 == 0o755 for n in ("containerd", "ctr"))


def test_interfaces_are_found_by_mac(tmp_path: Path) -> None:
    for name, mac in (("ens5", "02:00:00:00:00:01"), ("ens6", "02:00:00:00:00:02")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "address").write_text(mac + "\n")
    assert clouds.interface_with_mac("02:00:00:00:00:02", str(tmp_path)) == "ens6"
    assert clouds.interface_with_mac("02:00:00:00:00:03", str(tmp_path)) is None
