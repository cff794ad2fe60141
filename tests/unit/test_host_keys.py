"""Policy: every SSH connection to a bare-metal host verifies the host's pinned key before it sends anything.

`pulumi up` (pulumi-command's connection.host_key), the backup job (known_hosts, StrictHostKeyChecking=yes),
scripts/etcd-restore and scripts/dr-drill (a known_hosts built from the stack) and the integration replay all
accept the pinned key only; trustOnFirstUse pins a host to the key it reports at its first contact.
"""

from __future__ import annotations

import base64
import copy
import gzip
import io
import os
import runpy
import tarfile
import tempfile
from pathlib import Path
from typing import Any, ClassVar

import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from pulumi.runtime import mocks as pulumi_mocks

from components.config import ConfigError
from components.report import resilience_report
from components.restore.plan import Plan, build_plan, parser
from components.stack_file import PROJECT
from components.targets.baremetal import READ_HOST_KEY
from components.validation import load
from kcp_host.contract import BACKUP_SSH_KNOWN_HOSTS, BackupEnv
from kcp_host.destinations import Receiver
from tests.conftest import stack_for_tests
from tests.integration.realtls import plain
from tests.integration.replay import verified
from tests.integration.update_plan import plan_update, rerun_program
from tests.program import ROOT, Mocks, Program, run_program, stack_config

COMMAND = "command:remote:Command"
LOCAL = ROOT / "stacks" / "Pulumi.local.yaml"
PUBLIC = (serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)


def ed25519_key() -> str:
    """A throwaway host key made at run time: no key material lives in the repository."""
    return ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(*PUBLIC).decode()


def pinned(raw: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """The stack with a fresh hostKey on every host, spare and the backup host, and no trust on first use."""
    cfg = copy.deepcopy(raw)
    bm = cfg["baremetal"]
    bm.pop("trustOnFirstUse", None)
    for host in (*bm["hosts"], *bm["spares"], bm["backupHost"]):
        host["hostKey"] = ed25519_key()
    return cfg, {h["address"]: h["hostKey"] for h in (*bm["hosts"], *bm["spares"], bm["backupHost"])}


@pytest.fixture(scope="module")
def pinned_local(throwaway_ssh_key: Path) -> tuple[Program, dict[str, str]]:
    cfg, keys = pinned(stack_for_tests(LOCAL, throwaway_ssh_key))
    return run_program(cfg, stack="local"), keys


def connection(resource: Any) -> dict[str, Any]:
    return plain(resource.inputs)["connection"]


def bundle_files(resource: Any) -> dict[str, str]:
    raw = gzip.decompress(base64.b64decode(plain(resource.inputs["stdin"])))
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        return {m.name: tar.extractfile(m).read().decode() for m in tar.getmembers() if m.isfile()}  # type: ignore[union-attr]


# -- pulumi up ----------------------------------------------------------------------------------------------------

def test_every_declared_command_connects_pinned_to_its_hosts_key(pinned_local) -> None:
    program, keys = pinned_local
    commands = program.of_type(COMMAND)
    assert {connection(c)["host"] for c in commands} == set(keys), "a host, spare or the backup host is missing"
    for command in commands:
        assert connection(command).get("hostKey") == keys[connection(command)["host"]], command.name
    assert not [c.name for c in commands if c.name.endswith("-host-key")], "pinned hosts need no first contact"


class FirstContactMocks(Mocks):
    """Each host reports its own key when the first `pulumi up` reads it."""

    KEYS: ClassVar[dict[str, str]] = {}

    def computed_outputs(self, args: pulumi_mocks.MockResourceArgs) -> dict[str, Any]:
        if args.typ == COMMAND and args.inputs.get("create") == READ_HOST_KEY:
            return {"stdout": self.KEYS.setdefault(plain(args.inputs["connection"])["host"], ed25519_key())}
        return super().computed_outputs(args)


def test_trust_on_first_use_pins_every_step_to_the_key_the_host_reported_first(throwaway_ssh_key: Path) -> None:
    raw = stack_for_tests(LOCAL, throwaway_ssh_key)
    assert raw["baremetal"]["trustOnFirstUse"] is True, "the shipped local stack pins on first contact"
    program = run_program(raw, stack="local", mocks=FirstContactMocks)
    reads = {connection(r)["host"]: r for r in program.of_type(COMMAND) if r.name.endswith("-host-key")}
    assert set(reads) == set(FirstContactMocks.KEYS) and len(reads) == 5
    for read in reads.values():
        assert "hostKey" not in connection(read), "the first contact is the one connection that checks no key"
        assert read.ignore_changes == ["connection"], "a later connection change must not read the key again"
        assert "stdin" not in read.inputs, "the first contact ships nothing"
    for command in (c for c in program.of_type(COMMAND) if not c.name.endswith("-host-key")):
        host = connection(command)["host"]
        assert connection(command)["hostKey"] == FirstContactMocks.KEYS[host], command.name
        assert reads[host].urn in command.dependencies, f"{command.name} may run before its host's key is read"


def test_pinning_the_keys_first_contact_read_changes_no_step_but_the_backup_jobs_known_hosts(
        throwaway_ssh_key: Path) -> None:
    """The operator checks the keys the first `pulumi up` read and pins them: the second up (planned by the engine's
    rules) reaches a host only to give the members' backup job the backup host's key (a new file, no restart)."""
    raw = stack_for_tests(LOCAL, throwaway_ssh_key)
    first = run_program(raw, stack="local", mocks=FirstContactMocks)
    cfg = copy.deepcopy(raw)
    bm = cfg["baremetal"]
    bm.pop("trustOnFirstUse")
    for host in (*bm["hosts"], *bm["spares"], bm["backupHost"]):
        host["hostKey"] = FirstContactMocks.KEYS[host["address"]]
    plan = plan_update(first, rerun_program(cfg, first, stack="local", mocks=FirstContactMocks))
    assert sorted(plan.named("delete")) == sorted(r.name for r in first.resources if r.name.endswith("-host-key"))
    assert all(a.command is None for chain in plan.deletes for _, a in chain), "a deleted read runs something"
    changed = {c.name: c.paths for c in plan.changes if c.op not in ("same", "delete")}
    assert set(changed) == {f"local-{h}-etcd-config" for h in ("h1", "h2", "h3", "spare1")}, plan.preview()
    assert all(set(paths) <= {"stdin", "delete"} for paths in changed.values()), plan.preview()  # files it owns
    configs = {r.name: r for r in plan.after.resources if r.name in changed}
    assert all(BACKUP_SSH_KNOWN_HOSTS.lstrip("/") in bundle_files(r) for r in configs.values())


def test_trust_on_first_use_reads_only_the_hosts_without_a_pinned_key(throwaway_ssh_key: Path) -> None:
    raw = stack_for_tests(LOCAL, throwaway_ssh_key)
    key = raw["baremetal"]["hosts"][1]["hostKey"] = ed25519_key()
    program = run_program(raw, stack="local")
    assert "local-h2-host-key" not in {r.name for r in program.resources}
    assert all(connection(c)["hostKey"] == key for c in program.of_type(COMMAND) if c.name.startswith("local-h2-"))


# -- etcd-backup -----------------------------------------------------------------------------------------------------

def test_the_backup_job_knows_only_the_backup_hosts_pinned_key(pinned_local) -> None:
    program, keys = pinned_local
    for host in ("h1", "h2", "h3", "spare1"):
        files = bundle_files(program.named(f"local-{host}-etcd-config"))
        assert files[BACKUP_SSH_KNOWN_HOSTS.lstrip("/")] == f"10.250.0.20 {keys['10.250.0.20']}\n", host


def test_without_a_pinned_backup_host_key_no_known_hosts_is_shipped(declared) -> None:
    files = bundle_files(declared("local").named("local-h1-etcd-config"))
    assert BACKUP_SSH_KNOWN_HOSTS.lstrip("/") not in files, "the backup job learns it at its first contact"


@pytest.mark.parametrize(("present", "checking"), [(True, "yes"), (False, "accept-new")])
def test_the_backup_job_checks_strictly_once_known_hosts_is_there(tmp_path: Path, present: bool,
                                                                   checking: str) -> None:
    known_hosts = tmp_path / "known_hosts"
    if present:
        known_hosts.write_text(f"10.250.0.20 {ed25519_key()}\n")
    env = BackupEnv(dest="ssh://etcd-backup@10.250.0.20/srv/etcd-backups/local", cert="c", key="k",
                    ssh_key="/etc/etcd/backup-ssh/id_ed25519", ssh_known_hosts=str(known_hosts))
    argv = Receiver(env).argv
    options = {argv[i + 1] for i, arg in enumerate(argv) if arg == "-o"}
    assert {f"StrictHostKeyChecking={checking}", f"UserKnownHostsFile={known_hosts}",
            "GlobalKnownHostsFile=/dev/null"} <= options


# -- scripts/etcd-restore and scripts/dr-drill ----------------------------------------------------------------------

def ssh_options(argv: list[str]) -> list[str]:
    return [argv[i + 1] for i, arg in enumerate(argv) if arg == "-o"]


def restore_plan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *args: str) -> tuple[Plan, dict[str, str]]:
    """scripts/etcd-restore's plan for the local stack with every host key pinned; the pinned keys."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    cfg, keys = pinned(stack_config(LOCAL))
    stack = tmp_path / "Pulumi.local.yaml"
    stack.write_text(yaml.safe_dump({"config": {f"{PROJECT}:{k}": v for k, v in cfg.items()}}))
    return build_plan(parser(None).parse_args(["--stack", str(stack), *args])), keys


def test_the_restore_checks_each_pinned_host_against_the_stacks_key_only(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    plan, keys = restore_plan(tmp_path, monkeypatch, "--hosts", "h1=10.250.0.11,d1=10.9.0.1")
    options = ssh_options(plan.ssh.argv("10.250.0.11"))
    known_hosts = f"{plan.ssh.control_dir}/known_hosts"
    assert {"StrictHostKeyChecking=yes", f"UserKnownHostsFile={known_hosts}", "GlobalKnownHostsFile=/dev/null",
            "HostKeyAlgorithms=ssh-ed25519"} <= set(options)
    assert sorted(Path(known_hosts).read_text().splitlines()) == sorted(f"{a} {k}" for a, k in keys.items())
    assert "UserKnownHostsFile" not in " ".join(ssh_options(plan.ssh.argv("10.9.0.1"))), \
        "a host the stack does not pin is checked against the operator's own known_hosts"
    assert "StrictHostKeyChecking=yes" in ssh_options(plan.ssh.argv("10.9.0.1")), "never accept an unknown key"
    plan.ssh.close([])
    assert not os.path.exists(known_hosts), "the pinned keys' file goes with the control folder"


def test_an_operators_ssh_option_still_comes_first_and_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    plan, _ = restore_plan(tmp_path, monkeypatch, "--ssh-option", "UserKnownHostsFile=/mine")
    options = ssh_options(plan.ssh.argv("10.250.0.11"))
    assert options[0] == "UserKnownHostsFile=/mine" and "StrictHostKeyChecking=yes" in options


# -- the integration replay ----------------------------------------------------------------------------------------

def test_the_replay_checks_a_pinned_connection_as_pulumi_command_does() -> None:
    key = ed25519_key()
    with verified("10.250.0.11", key) as options:
        file = next(o for o in ssh_options(options) if o.startswith("UserKnownHostsFile="))
        assert Path(file.split("=", 1)[1]).read_text() == f"10.250.0.11 {key}\n"
        assert {"StrictHostKeyChecking=yes", "GlobalKnownHostsFile=/dev/null",
                "HostKeyAlgorithms=ssh-ed25519"} <= set(ssh_options(options))
    with verified("10.250.0.11", None) as options:
        assert options == [], "pulumi-command accepts any key when given none"


# -- config ----------------------------------------------------------------------------------------------------------

def strict(raw: dict[str, Any]) -> dict[str, Any]:
    cfg, _ = pinned(raw)
    return cfg


@pytest.mark.parametrize("where", ["hosts.2", "spares.0", "backupHost"])
def test_a_missing_host_key_without_trust_on_first_use_is_one_error_naming_the_key(where: str) -> None:
    cfg = strict(stack_config(LOCAL))
    section, _, index = where.partition(".")
    entry = cfg["baremetal"][section][int(index)] if index else cfg["baremetal"][section]
    del entry["hostKey"]
    key = f"baremetal.{section}[{index}].hostKey" if index else f"baremetal.{section}.hostKey"
    with pytest.raises(ConfigError) as error:
        load(cfg)
    assert error.value.key == key and "trustOnFirstUse" in error.value.allowed


def test_trust_on_first_use_allows_hosts_without_a_key() -> None:
    assert load(stack_config(LOCAL)).baremetal.trust_on_first_use  # type: ignore[union-attr]


def ecdsa_key() -> str:
    return ec.generate_private_key(ec.SECP384R1()).public_key().public_bytes(*PUBLIC).decode()


def test_ed25519_and_ecdsa_keys_with_a_comment_are_accepted() -> None:
    cfg = strict(stack_config(LOCAL))
    cfg["baremetal"]["hosts"][0]["hostKey"] = f"{ed25519_key()} root@h1"
    cfg["baremetal"]["hosts"][1]["hostKey"] = ecdsa_key()
    assert load(cfg).baremetal.hosts[1].host_key.startswith("ecdsa-sha2-nistp384 ")  # type: ignore[union-attr]


def _malformed() -> list[tuple[str, str]]:
    good = ed25519_key()
    blob = good.split()[1]
    rsa_key = rsa.generate_private_key(65537, 2048).public_key().public_bytes(*PUBLIC).decode()
    other_blob = ecdsa_key().split()[1]
    return [
        ("options", f'from="10.0.0.1" {good}'),
        ("ssh-keyscan's host column", f"10.250.0.13 {good}"),
        ("a second line", f"{good}\nssh-ed25519 {blob}"),
        ("a trailing newline", f"{good}\n"),
        ("ssh-rsa", rsa_key),
        ("an unknown type", f"ssh-dss {blob}"),
        ("not base64", f"ssh-ed25519 {blob[:-3]}!!="),
        ("a truncated key", f"ssh-ed25519 {blob[:40]}"),
        ("another type's blob", f"ssh-ed25519 {other_blob}"),
        ("a comment with a quote", f'{good} "x'),
        ("no key at all", "ssh-ed25519"),
    ]


@pytest.mark.parametrize(("what", "value"), _malformed(), ids=[what for what, _ in _malformed()])
def test_a_malformed_host_key_is_refused(what: str, value: str) -> None:
    cfg = strict(stack_config(LOCAL))
    cfg["baremetal"]["hosts"][2]["hostKey"] = value
    with pytest.raises(ConfigError) as error:
        load(cfg)
    assert error.value.key == "baremetal.hosts[2].hostKey", what
    assert "ssh-ed25519" in error.value.allowed


# -- what operators read ---------------------------------------------------------------------------------------------

def test_the_report_says_which_hosts_are_trusted_on_first_use_and_when_all_are_pinned() -> None:
    tofu = resilience_report(load(stack_config(LOCAL)))
    assert "**trust on first use** for h1, h2, h3, spare1, the backup host" in tofu and "nothing verified" in tofu
    assert "SSH host keys: all pinned (hostKey)" in resilience_report(load(strict(stack_config(LOCAL))))


def test_pulumi_yaml_documents_host_keys_and_trust_on_first_use() -> None:
    described = yaml.safe_load((ROOT / "Pulumi.yaml").read_text())["config"]["baremetal"]["description"]
    assert "hostKey" in described and "trustOnFirstUse: false" in described


def test_scripts_sandbox_pins_the_keys_in_the_stack_file_keeping_its_layout() -> None:
    pin_host_keys = runpy.run_path(str(ROOT / "scripts" / "sandbox"), run_name="sandbox_cli")["pin_host_keys"]
    keys = {"10.250.0.11": ed25519_key(), "10.250.0.20": ed25519_key(), "10.250.0.99": ed25519_key()}
    text, done = pin_host_keys(LOCAL.read_text(), keys)
    again, _ = pin_host_keys(text, {"10.250.0.11": keys["10.250.0.20"]})
    assert sorted(done) == ["10.250.0.11", "10.250.0.20"]
    assert [line for line in LOCAL.read_text().splitlines() if line.lstrip().startswith("#")] == \
        [line for line in again.splitlines() if line.lstrip().startswith("#")], "comments are kept"
    bm = yaml.safe_load(again)["config"][f"{PROJECT}:baremetal"]
    assert bm["hosts"][0]["hostKey"] == keys["10.250.0.20"], "a second run replaces the key"
    assert bm["backupHost"]["hostKey"] == keys["10.250.0.20"] and "hostKey" not in bm["hosts"][1]
