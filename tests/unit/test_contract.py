"""The contract between the renderer and the host agent (kcp_host/contract.py) holds in one place."""

from __future__ import annotations

import dataclasses
import re
import subprocess
from pathlib import Path

import pytest

from components.render import etcd
from kcp_host import contract
from kcp_host.contract import BackupEnv, BootEnv, ClusterEnv, ContractError, env_name, load_env, render_env

ROOT = Path(__file__).resolve().parents[2]
MEMBERS = (etcd.Member("h1", "10.0.0.11"), etcd.Member("h2", "10.0.0.12"), etcd.Member("h3", "10.0.0.13"))


def written(tmp_path: Path, text: str) -> str:
    path = tmp_path / "file.env"
    path.write_text(text)
    return str(path)


def test_docs_host_layout_tables_are_generated_from_the_contract() -> None:
    doc = (ROOT / "docs" / "host-layout.md").read_text()
    assert contract.docs_with_tables(doc) == doc, "run `.venv/bin/python -m kcp_host.contract --write`"


def test_the_rendered_cluster_env_is_exactly_what_the_agent_reads(tmp_path: Path) -> None:
    settings = etcd.EtcdSettings("prod", 100, 1000, "prod-etcd")
    env = load_env(ClusterEnv, written(tmp_path, etcd.cluster_env(settings, MEMBERS[1], MEMBERS)), environ={})
    assert (env.cluster_name, env.member_name) == ("prod", "h2")
    assert env.peer_url == "https://10.0.0.12:2380" and env.client_url == "https://10.0.0.12:2379"
    assert env.initial_cluster == etcd.initial_cluster(MEMBERS)
    assert env.client_endpoints == tuple(m.client_url for m in MEMBERS)
    assert env.data_dir == contract.DATA_DIR and env.member_id_file == f"{contract.DATA_DIR}/member/kcp-member-id"
    assert env.lock_wait_seconds == ClusterEnv.lock_wait_seconds, "an optional value not written keeps its default"


@pytest.mark.parametrize("cls", contract.ENV_FILES)
def test_every_env_file_round_trips_and_can_be_sourced_by_a_shell(cls: type[contract.EnvFile],
                                                                 tmp_path: Path) -> None:
    odd = "it's $HOME `x`; a,b"
    values = {f.name: (("one", "two") if "tuple" in str(f.type) else 7 if f.type == "int" else
                       False if f.type == "bool" else odd) for f in dataclasses.fields(cls)}
    instance = cls(**values)
    text = render_env(instance, "test")
    assert load_env(cls, written(tmp_path, text), environ={}) == instance
    first = next(f for f in dataclasses.fields(cls) if f.type == "str")
    name = env_name(cls, first.name)
    shell = subprocess.run(["bash", "-c", f'. {tmp_path / "file.env"}; printf %s "${name}"'],
                           capture_output=True, text=True, check=True).stdout
    assert shell == odd


def test_a_missing_required_variable_is_named_with_its_file(tmp_path: Path) -> None:
    path = written(tmp_path, "KCP_CLUSTER_NAME=prod\n")
    with pytest.raises(ContractError, match=rf"KCP_MEMBER_NAME is not set in {re.escape(path)}"):
        load_env(ClusterEnv, path, environ={})


def test_the_file_wins_over_the_environment_which_wins_over_the_default(tmp_path: Path) -> None:
    base = render_env(BackupEnv(dest="s3://b/p", cert="/c", key="/k"), "test")
    path = written(tmp_path, base + "KCP_BACKUP_SSH_KEY=/from-file\n")
    env = load_env(BackupEnv, path, environ={"KCP_BACKUP_SSH_KEY": "/from-env", "KCP_BACKUP_VERIFY": "false"})
    assert (env.ssh_key, env.verify, env.work_dir) == ("/from-file", False, BackupEnv.work_dir)


@pytest.mark.parametrize(("line", "error"), [("KCP_BACKUP_VERIFY=yes", "true or false"),
                                              ("not a line", "KEY=VALUE")])
def test_bad_values_are_refused_with_the_variable_named(tmp_path: Path, line: str, error: str) -> None:
    base = render_env(BackupEnv(dest="s3://b/p", cert="/c", key="/k"), "test")
    with pytest.raises(ContractError, match=error):
        load_env(BackupEnv, written(tmp_path, base + line + "\n"), environ={})


def test_an_integer_setting_that_is_not_one_is_refused_with_the_variable_named(tmp_path: Path) -> None:
    base = render_env(BootEnv(provider="gce", cluster="c", roles=("etcd",), programs_secrets=("p",), disk="local",
                              marker="gs://b/m"), "test")
    with pytest.raises(ContractError, match=r"KCP_BOOT_WAIT_SECONDS.*an integer"):
        load_env(BootEnv, written(tmp_path, base + "KCP_BOOT_WAIT_SECONDS=x\n"), environ={})


def test_the_agent_reads_no_variable_outside_the_contract() -> None:
    """Every KCP_* name in the agent's code is a contract variable (or the override naming a file)."""
    known = {env_name(cls, f.name) for cls in contract.ENV_FILES for f in dataclasses.fields(cls)}
    known |= {cls.OVERRIDE for cls in contract.ENV_FILES} | {cls.PREFIX.rstrip("_") for cls in contract.ENV_FILES}
    used = {name for path in (ROOT / "kcp_host").glob("*.py") if path.name != "contract.py"
            for name in re.findall(r"\bKCP_[A-Z0-9_]+", path.read_text())}
    assert used <= known, f"read outside kcp_host/contract.py: {sorted(used - known)}"

