"""Policy: every bad stack config is refused with one message naming key, value and what is allowed.

Each case changes one thing in a valid stack and expects the ConfigError for that key.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from components.config import ConfigError
from components.validation import load
from tests.program import ROOT, stack_config

LOCAL = stack_config(ROOT / "stacks" / "Pulumi.local.yaml")
GCE = stack_config(ROOT / "stacks" / "Pulumi.gce-example.yaml")
AWS = stack_config(ROOT / "stacks" / "Pulumi.aws-example.yaml")

Edit = Callable[[dict[str, Any]], None]


def _generated_private_key() -> str:
    """A throwaway key made at run time: no key material lives in the repository."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519
    return ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()).decode()


def _set(path: str, value: Any) -> Edit:
    def edit(cfg: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = cfg
        for part in parents:
            node = node[int(part)] if part.isdigit() else node.setdefault(part, {})
        if last.isdigit():
            node[int(last)] = value
        else:
            node[last] = value
    return edit


def _delete(path: str) -> Edit:
    def edit(cfg: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = cfg
        for part in parents:
            node = node[part]
        del node[last]
    return edit


def _host(index: int, **changes: Any) -> Edit:
    def edit(cfg: dict[str, Any]) -> None:
        cfg["baremetal"]["hosts"][index].update(changes)
    return edit


def _roles(*roles_per_host: list[str]) -> Edit:
    def edit(cfg: dict[str, Any]) -> None:
        for host, roles in zip(cfg["baremetal"]["hosts"], roles_per_host, strict=True):
            host["roles"] = roles
    return edit


def _both(*edits: Edit) -> Edit:
    def edit(cfg: dict[str, Any]) -> None:
        for e in edits:
            e(cfg)
    return edit


BAD: list[tuple[str, dict[str, Any], Edit, str]] = [
    # (case id, base stack, edit, key named in the error)
    ("unknown-target", LOCAL, _set("target", "azure"), "target"),
    ("cluster-name-uppercase", LOCAL, _set("clusterName", "Prod"), "clusterName"),
    ("cluster-name-too-long", LOCAL, _set("clusterName", "a" * 21), "clusterName"),
    ("cluster-name-leading-digit", LOCAL, _set("clusterName", "1prod"), "clusterName"),
    ("cluster-name-missing", LOCAL, _delete("clusterName"), "clusterName"),
    ("kubernetes-version-unpinned", LOCAL, _set("kubernetesVersion", "1.29.0"), "kubernetesVersion"),
    ("resilience-unknown", LOCAL, _set("resilience", "maximal"), "resilience"),
    ("etcd-members-even", GCE, _set("etcd.members", 4), "etcd.members"),
    ("etcd-members-one-default", GCE, _set("etcd.members", 1), "etcd.members"),
    ("etcd-members-seven", GCE, _set("etcd.members", 7), "etcd.members"),
    ("api-servers-one-default", GCE, _set("apiServers.count", 1), "apiServers.count"),
    ("api-servers-zero", GCE, _set("apiServers.count", 0), "apiServers.count"),
    ("etcd-placement-unknown", GCE, _set("etcd.placement", "shared"), "etcd.placement"),
    ("etcd-disk-unknown", GCE, _set("etcd.disk", "nfs"), "etcd.disk"),
    ("etcd-version-unpinned", GCE, _set("etcd.version", "3.5.0"), "etcd.version"),
    ("etcd-distro-on-cloud", GCE, _both(_set("etcd.source", "distro"), _set("etcd.version", "3.4.23")), "etcd.source"),
    ("election-below-5x-heartbeat", GCE, _both(_set("etcd.heartbeatMs", 300), _set("etcd.electionMs", 1000)),
     "etcd.electionMs"),
    ("election-above-50s", GCE, _set("etcd.electionMs", 60_000), "etcd.electionMs"),
    ("heartbeat-too-small", GCE, _set("etcd.heartbeatMs", 1), "etcd.heartbeatMs"),
    ("colocated-count-mismatch", GCE, _both(_set("etcd.placement", "colocated"), _set("apiServers.count", 2)),
     "apiServers.count"),
    ("backup-interval-too-short", GCE, _set("backup.intervalMinutes", 1), "backup.intervalMinutes"),
    ("backup-retain-negative", GCE, _set("backup.retain", {"recent": 0, "daily": 7}), "backup.retain.recent"),
    ("backup-verify-not-bool", GCE, _set("backup.verify", "sometimes"), "backup.verify"),
    ("unknown-top-level-key", GCE, _set("etcdMembers", 3), "etcdMembers"),
    ("unknown-nested-key", GCE, _set("etcd.member", 3), "etcd.member"),
    ("pod-cidr-invalid", GCE, _set("network.podCidr", "10.244.0.0/33"), "network.podCidr"),
    ("pod-cidr-host-bits", GCE, _set("network.podCidr", "10.244.0.1/16"), "network.podCidr"),
    ("service-cidr-too-large", GCE, _set("network.serviceCidr", "10.0.0.0/8"), "network.serviceCidr"),
    ("cidrs-overlap", GCE, _set("network.serviceCidr", "10.244.16.0/20"), "network.serviceCidr"),
    ("admin-cidr-invalid", GCE, _set("network.adminCidrs", ["everyone"]), "network.adminCidrs[0]"),
    ("gce-zone-malformed", GCE, _set("zones", ["europe-west1", "europe-west1-c", "europe-west1-d"]), "zones[0]"),
    ("gce-zone-other-region", GCE, _set("zones", ["europe-west1-b", "europe-west1-c", "us-east1-b"]), "zones[2]"),
    ("zones-repeated", GCE, _set("zones", ["europe-west1-b", "europe-west1-b", "europe-west1-c"]), "zones"),
    ("zones-empty", GCE, _set("zones", []), "zones"),
    ("five-members-over-two-zones", GCE,
     _both(_set("etcd.members", 5), _set("zones", ["europe-west1-b", "europe-west1-c"])), "zones"),
    ("three-members-over-two-zones", AWS, _set("zones", ["eu-west-1a", "eu-west-1b"]), "zones"),
    ("aws-zone-malformed", AWS, _set("zones", ["eu-west-1", "eu-west-1b", "eu-west-1c"]), "zones[0]"),
    ("aws-section-missing", AWS, _delete("aws"), "aws"),
    ("second-target-section", AWS, _set("gce", {"project": "my-project", "region": "europe-west1"}), "gce"),
    ("gce-network-without-subnetwork", GCE, _set("gce.network", "shared-vpc"), "gce.subnetwork"),
    ("gce-subnet-cidr-invalid", GCE, _set("gce.subnetCidr", "10.10.0.0/33"), "gce.subnetCidr"),
    ("aws-vpc-cidr-invalid", AWS, _set("aws.vpcCidr", "10.20.0.1/16"), "aws.vpcCidr"),
    ("aws-vpc-cidr-too-small", AWS, _set("aws.vpcCidr", "10.20.0.0/26"), "aws.vpcCidr"),
    ("aws-subnets-with-public-api", AWS, _set("aws.subnetIds", ["subnet-0123456789abcdef0"] * 3), "aws.publicApi"),
    ("aws-subnets-not-one-per-zone", AWS, _both(_set("aws.publicApi", False),
                                                _set("aws.subnetIds", ["subnet-0123456789abcdef0"])), "aws.subnetIds"),
    ("aws-subnet-id-malformed", AWS, _both(_set("aws.publicApi", False), _set(
        "aws.subnetIds", ["subnet-0123456789abcdef0", "subnet-0123456789abcdef1", "sn-1"])), "aws.subnetIds[2]"),
    ("baremetal-persistent-disk", LOCAL, _set("etcd.disk", "persistent"), "etcd.disk"),
    ("baremetal-zone-label-invalid", LOCAL, _set("zones", ["Rack A", "rack-b", "rack-c"]), "zones[0]"),
    ("baremetal-duplicate-name", LOCAL, _host(1, name="h1"), "baremetal.hosts.name[1]"),
    ("baremetal-duplicate-address", LOCAL, _host(2, address="10.250.0.11"), "baremetal.hosts.address[2]"),
    ("baremetal-address-invalid", LOCAL, _host(0, address="10.250.0.300"), "baremetal.hosts[0].address"),
    ("baremetal-host-zone-unknown", LOCAL, _host(0, zone="rack-z"), "baremetal.hosts[0].zone"),
    ("baremetal-role-unknown", LOCAL, _host(0, roles=["etcd", "apiserver", "database"]), "baremetal.hosts[0].roles[2]"),
    ("baremetal-too-few-etcd-hosts", LOCAL, _host(2, roles=["apiserver", "loadbalancer"]), "baremetal.hosts"),
    ("baremetal-one-loadbalancer", LOCAL,
     _roles(["etcd", "apiserver", "loadbalancer"], ["etcd", "apiserver"], ["etcd", "apiserver"]), "baremetal.hosts"),
    ("baremetal-vip-is-host", LOCAL, _set("baremetal.apiVip", "10.250.0.12"), "baremetal.apiVip"),
    ("baremetal-vip-invalid", LOCAL, _set("baremetal.apiVip", "vip.example"), "baremetal.apiVip"),
    ("baremetal-backup-on-member", LOCAL, _set("baremetal.backupHost", {"address": "10.250.0.11"}),
     "baremetal.backupHost.address"),
    ("baremetal-backup-path-relative", LOCAL, _set("baremetal.backupHost.path", "backups"),
     "baremetal.backupHost.path"),
    ("baremetal-no-ssh-key", LOCAL, _delete("baremetal.sshPrivateKeyPath"), "baremetal.sshPrivateKey"),
    ("baremetal-two-ssh-keys", LOCAL, _set("baremetal.sshPrivateKey", "key-material-placeholder"),
     "baremetal.sshPrivateKey"),
    ("baremetal-spare-clashes", LOCAL,
     _set("baremetal.spares", [{"name": "h2", "address": "10.250.0.15", "zone": "rack-a"}]), "baremetal.hosts.name[3]"),
    ("baremetal-colocated-mismatch", LOCAL, _host(0, roles=["etcd", "loadbalancer"]), "baremetal.hosts"),
    ("baremetal-takeover-too-fast", LOCAL, _set("baremetal.spareTakeoverAfterSeconds", 5),
     "baremetal.spareTakeoverAfterSeconds"),
]


@pytest.mark.parametrize(("base", "edit", "key"), [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_config_is_refused_with_one_message_naming_key_value_and_allowed(
        base: dict[str, Any], edit: Edit, key: str) -> None:
    cfg = copy.deepcopy(base)
    edit(cfg)
    with pytest.raises(ConfigError) as caught:
        load(cfg)
    error = caught.value
    assert error.key == key, f"expected the error to name {key}, got {error.key}: {error}"
    message = str(error)
    assert message.count("config key") == 1 and "\n" not in message
    assert f"'{key}'" in message and "allowed:" in message and error.allowed


def test_there_are_at_least_thirty_bad_config_cases() -> None:
    assert len(BAD) >= 30


@pytest.mark.parametrize("stack", sorted((ROOT / "stacks").glob("Pulumi.*.yaml")), ids=lambda p: p.name)
def test_every_shipped_stack_is_valid(stack: Path) -> None:
    cfg = load(stack_config(stack))
    assert cfg.cluster_name


def test_zone_error_says_which_zone_holds_a_quorum() -> None:
    cfg = copy.deepcopy(GCE)
    cfg["etcd"]["members"] = 5
    cfg["zones"] = ["europe-west1-b", "europe-west1-c"]
    with pytest.raises(ConfigError, match="zone europe-west1-b would hold 3 of 5"):
        load(cfg)


def test_load_balancers_must_not_share_one_zone() -> None:
    cfg = copy.deepcopy(LOCAL)
    cfg["baremetal"]["hosts"] = [
        {"name": "h1", "address": "10.250.0.11", "zone": "rack-a", "roles": ["etcd", "apiserver", "loadbalancer"]},
        {"name": "h2", "address": "10.250.0.12", "zone": "rack-b", "roles": ["etcd", "apiserver"]},
        {"name": "h3", "address": "10.250.0.13", "zone": "rack-c", "roles": ["etcd", "apiserver"]},
        {"name": "lb2", "address": "10.250.0.15", "zone": "rack-a", "roles": ["loadbalancer"]},
    ]
    with pytest.raises(ConfigError, match=r"load balancers \(API VIP holders\) .* \(all are in rack-a\)"):
        load(cfg)


def test_minimal_allows_one_member_and_one_api_server() -> None:
    cfg = copy.deepcopy(GCE)
    cfg.update(resilience="minimal", zones=["europe-west1-b"])
    cfg["etcd"]["members"] = 1
    cfg["apiServers"]["count"] = 1
    assert load(cfg).etcd.members == 1


def test_ssh_private_key_is_kept_as_a_secret_string() -> None:
    cfg = copy.deepcopy(LOCAL)
    del cfg["baremetal"]["sshPrivateKeyPath"]
    key = _generated_private_key()
    cfg["baremetal"]["sshPrivateKey"] = key
    model = load(cfg)
    assert model.baremetal is not None and key not in repr(model.baremetal)
    assert "PRIVATE KEY" not in repr(model)


def test_pulumi_yaml_declares_every_config_key_with_a_description() -> None:
    import yaml

    from components.config import TOP_LEVEL_KEYS
    project = yaml.safe_load((ROOT / "Pulumi.yaml").read_text())
    declared = project["config"]
    assert project["name"] == "resilient-control-plane" and project["stackConfigDir"] == "stacks"
    assert set(declared) == set(TOP_LEVEL_KEYS), set(declared) ^ set(TOP_LEVEL_KEYS)
    for key, declaration in declared.items():
        assert declaration.get("description"), f"Pulumi.yaml config key {key} has no description"


# -- new-user papercuts: the SSH key file, and the README's commands as root without sudo -----------

def _with_key_file(path: Path | str) -> Any:
    from components.config import ClusterConfig
    cfg = copy.deepcopy(LOCAL)
    cfg["baremetal"]["sshPrivateKeyPath"] = str(path)
    model: ClusterConfig = load(cfg)
    return model


@pytest.mark.parametrize(("make", "problem"), [
    (lambda d: d / "missing", "there is no such file"),
    (lambda d: d, "it is not a regular file"),
    (lambda d: Path("/dev/zero"), "it is not a regular file"),  # read to the end, it would never end
    (lambda d: (d / "empty").write_text("\n") and d / "empty", "it is empty"),
    (lambda d: (d / "huge").write_bytes(b"x" * 70_000) and d / "huge", "it is larger than 65536 bytes"),
    (lambda d: (d / "id.pub").write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIE0 me\n") and d / "id.pub",
     "holds no OpenSSH or PEM private key"),
], ids=["missing", "directory", "device", "empty", "huge", "public-key"])
def test_a_bad_ssh_key_file_is_one_config_error_naming_key_and_path(
        tmp_path: Path, make: Callable[[Path], Path], problem: str) -> None:
    from components.validation import ssh_key_file
    path = make(tmp_path)
    with pytest.raises(ConfigError) as caught:
        ssh_key_file(_with_key_file(path))
    message = str(caught.value)
    assert caught.value.key == "baremetal.sshPrivateKeyPath" and problem in message
    assert message.count(str(path)) == 2 and "\n" not in message  # the value, and the path it was read as


def test_an_unreadable_ssh_key_file_is_one_config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from components.validation import ssh_key_file

    def denied(self: Path, *args: Any, **kwargs: Any) -> Any:
        raise PermissionError(13, "Permission denied", str(self))
    monkeypatch.setattr(Path, "open", denied)
    with pytest.raises(ConfigError, match=r"it cannot be read \(Permission denied\)"):
        ssh_key_file(_with_key_file(tmp_path / "id_ed25519"))


def test_a_readable_ssh_key_file_passes(throwaway_ssh_key: Path) -> None:
    from components.validation import ssh_key_file
    ssh_key_file(_with_key_file(throwaway_ssh_key))


def test_pulumi_up_with_a_missing_key_file_stops_with_the_message_before_declaring_anything(tmp_path: Path) -> None:
    """Pulumi prints a RunError's message alone: no traceback, and no resource was registered."""
    import pulumi

    from tests.program import Mocks, run_program
    registered: list[str] = []

    class Recording(Mocks):
        def new_resource(self, args: Any) -> tuple[str, dict[str, Any]]:
            registered.append(args.name)
            return super().new_resource(args)

    cfg = copy.deepcopy(LOCAL)
    cfg["baremetal"]["sshPrivateKeyPath"] = str(tmp_path / "id_ed25519")
    with pytest.raises(pulumi.RunError) as caught:
        run_program(cfg, stack="local", mocks=Recording)
    assert str(caught.value).startswith("config key 'baremetal.sshPrivateKeyPath'")
    assert f"{tmp_path / 'id_ed25519'}: there is no such file" in str(caught.value)
    assert registered == []


def _wrapper_tree(tmp_path: Path, uid: int, sudo: str | None) -> tuple[Path, dict[str, str]]:
    """A copy of scripts/test and scripts/up beside stubs (install-deps, sandbox, pytest, pulumi), and a PATH that
    holds bash and coreutils, a stand-in `id` and, unless `sudo` is None, a stand-in `sudo` that runs its command
    as uid 0 (`sudo -n true` succeeds only when `sudo` is "passwordless")."""
    import shutil
    bash = shutil.which("bash")
    assert bash
    repo, bin_dir, log = tmp_path / "repo", tmp_path / "bin", tmp_path / "log"
    stubs = {
        repo / "scripts" / "install-deps": 'echo "install-deps uid=$(id -u)" >> "$LOG"',
        repo / "scripts" / "sandbox": 'echo "sandbox uid=$(id -u) $*" >> "$LOG"',
        repo / ".venv" / "bin" / "python": 'echo "python uid=$(id -u) $*" >> "$LOG"',
        bin_dir / "pulumi": 'echo "pulumi uid=$(id -u) $*" >> "$LOG"',
        bin_dir / "id": 'echo "${FAKE_UID:?}"',
    }
    if sudo is not None:
        stubs[bin_dir / "sudo"] = (f'echo "sudo $*" >> "$LOG"\n'
                                   f'if [[ $1 == -n ]]; then [[ {sudo} == passwordless ]]; exit; fi\n'
                                   'shift; FAKE_UID=0 exec "$@"')
    for path, body in stubs.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"#!{bash}\n{body}\n")
        path.chmod(0o755)
    for script in ("test", "up"):
        shutil.copy2(ROOT / "scripts" / script, repo / "scripts" / script)
    (repo / "stacks").mkdir()
    for stack in ("local", "gce-example"):
        (repo / "stacks" / f"Pulumi.{stack}.yaml").write_text("config: {}\n")
    for tool in ("bash", "dirname", "mkdir", "cat", "install", "openssl"):
        found = shutil.which(tool)
        assert found
        (bin_dir / tool).symlink_to(found)
    return repo, {"PATH": str(bin_dir), "LOG": str(log), "FAKE_UID": str(uid), "HOME": str(tmp_path)}


def _run_wrapper(tmp_path: Path, command: list[str], uid: int, sudo: str | None) -> tuple[int, list[str], str]:
    import subprocess
    repo, env = _wrapper_tree(tmp_path, uid, sudo)
    proc = subprocess.run(command, cwd=repo, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=30)
    log = Path(env["LOG"])
    return proc.returncode, log.read_text().splitlines() if log.exists() else [], proc.stderr


@pytest.mark.parametrize(("uid", "sudo", "expected"), [
    (0, None, ["install-deps uid=0", "python uid=0 -m pytest -q tests/unit"]),
    (0, "passwordless", ["install-deps uid=0", "python uid=0 -m pytest -q tests/unit"]),
    (1000, "passwordless", ["sudo -n true", "sudo -- scripts/test -q tests/unit", "install-deps uid=0",
                            "python uid=0 -m pytest -q tests/unit"]),
    (1000, "password-and-no-terminal", ["sudo -n true", "install-deps uid=1000",
                                        "python uid=1000 -m pytest -q tests/unit"]),
    (1000, None, ["install-deps uid=1000", "python uid=1000 -m pytest -q tests/unit"]),
], ids=["root-without-sudo", "root-with-sudo", "user-with-sudo", "user-whose-sudo-cannot-ask", "user-without-sudo"])
def test_scripts_test_runs_as_root_itself_and_uses_sudo_only_when_not_root(
        tmp_path: Path, uid: int, sudo: str | None, expected: list[str]) -> None:
    code, log, stderr = _run_wrapper(tmp_path, ["scripts/test", "-q", "tests/unit"], uid, sudo)
    assert (code, log) == (0, expected), stderr


@pytest.mark.parametrize(("stack", "uid", "sudo", "expected"), [
    ("local", 0, None, ["install-deps uid=0", "sandbox uid=0 up", "pulumi uid=0 up --stack local --yes"]),
    ("local", 1000, "passwordless", ["sudo -n true", "sudo -- scripts/up local --yes", "install-deps uid=0",
                                     "sandbox uid=0 up", "pulumi uid=0 up --stack local --yes"]),
    ("gce-example", 1000, "passwordless", ["install-deps uid=1000", "pulumi uid=1000 up --stack gce-example --yes"]),
], ids=["local-as-root-without-sudo", "local-as-user-with-sudo", "cloud-stack-stays-the-user"])
def test_scripts_up_runs_the_local_stack_as_root_with_or_without_sudo(
        tmp_path: Path, stack: str, uid: int, sudo: str | None, expected: list[str]) -> None:
    code, log, stderr = _run_wrapper(tmp_path, ["scripts/up", stack, "--yes"], uid, sudo)
    assert code == 0, stderr
    passphrase = tmp_path / "repo" / ".pulumi-state" / "passphrase"
    if stack == "local":  # the state holds every key of the cluster: its passphrase is this checkout's own
        assert passphrase.stat().st_mode & 0o777 == 0o600 and len(passphrase.read_text().strip()) >= 40
    assert [line for line in log if not line.startswith(("pulumi uid=0 login", "pulumi uid=0 stack",
                                                         "pulumi uid=1000 login", "pulumi uid=1000 stack"))] == expected


def test_scripts_up_local_without_root_or_sudo_says_it_needs_root(tmp_path: Path) -> None:
    code, log, stderr = _run_wrapper(tmp_path, ["scripts/up", "local"], 1000, None)
    assert (code, log) == (1, []) and "needs root" in stderr


def test_readme_commands_need_no_sudo_and_ci_runs_the_readme_test_command() -> None:
    """The README opens with the two commands (set up and run; test), which work as root with or without sudo
    installed; nothing in README or docs tells anyone to type `sudo`; CI runs the README's test command."""
    import re
    readme = (ROOT / "README.md").read_text()
    block = readme.split("```bash\n", 1)[1].split("```", 1)[0].splitlines()
    commands = [line.split("#", 1)[0].strip() for line in block[:2]]
    assert commands == ["scripts/up local", "scripts/test"]
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        typed = re.findall(r"(?:^|`)\s*sudo\s+(?!-n`)[^`\n]*", doc.read_text(), flags=re.MULTILINE)
        assert not typed, f"{doc.name}: {typed}"
    assert commands[1] in (ROOT / ".ci" / "run").read_text().splitlines()
