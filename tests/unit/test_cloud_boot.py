"""Policies of what GCE and AWS share: the rendered boot path, bundles, retention, and one shape.

The boot script must carry the repository's bootstrap byte for byte, its settings as the agent
reads them, no secret, and fit the cloud's limit; both target classes must expose the same
methods in the same order, so a reader compares them line by line.
"""

from __future__ import annotations

import base64
import gzip
import io
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

import pytest

from components.config import ClusterConfig
from components.render import boot
from components.render.agent import ENSURE_PYTHON, agent_files
from components.render.hostfiles import UNPACK_BUNDLE, HostFile, bundle
from components.targets import cloud
from components.targets.aws import AwsTarget
from components.targets.gce import GceTarget
from components.validation import load
from components.versions import ETCD_SHA256, kubelet_release_args
from kcp_host.contract import (
    AGENT,
    DELTA_UNIT_FILE,
    MEMBERSHIP_TIMER_FILE,
    BackupEnv,
    BootEnv,
    SlotEnv,
    load_env,
    render_env,
)
from tests.integration.realtls import plain
from tests.program import ROOT, stack_config

AWS_USER_DATA_MAX = 16_384
ENV = BootEnv(provider="aws", cluster="prod", roles=("etcd", "apiserver"),
              programs_secrets=("prod-host-programs", "prod-host-programs-2"), disk="persistent",
              marker="s3://" + "b" * 63 + "/prod/cluster-formed", forward_ports=("2379", "2381", "6443"),
              aws_region="ap-southeast-2", vpc_cidr="10.30.0.0/16")
BOOT_ENV_FILE = re.compile(rf"install -m 0644 /dev/stdin {BootEnv.PATH} <<'KCP_BOOT_EOF'\n(.*?)\nKCP_BOOT_EOF\n", re.S)


def _cfg(stack: str) -> ClusterConfig:
    return load(stack_config(ROOT / "stacks" / f"Pulumi.{stack}.yaml"))


@pytest.mark.parametrize("provider", boot.PROVIDERS)
def test_boot_script_carries_the_bootstrap_unchanged_and_runs_it_at_every_boot(provider: str) -> None:
    script = boot.boot_script(BootEnv(**{**vars(ENV), "provider": provider}))
    assert boot.BOOTSTRAP.read_text() in script, "kcp-bootstrap is not embedded verbatim"
    assert f"KCP_BOOT_PROVIDER={provider}\n" in script
    assert "ExecStart=/usr/local/lib/kcp/kcp-bootstrap\n" in boot.boot_unit() and boot.boot_unit() in script
    assert f"ExecStartPre=/bin/bash -c '{ENSURE_PYTHON}'\n" in script, "python3 is ensured before the bootstrap"
    assert "systemctl enable kcp-boot.service" in script


def refresh_problems(script: str) -> list[str]:
    """What a startup script misses of the refresh timer: its units as rendered for the script's own boot.env, and
    starting it (the cloud policy tests ask this of every template)."""
    found = BOOT_ENV_FILE.search(script)
    if not found:
        return ["no boot.env"]
    with tempfile.NamedTemporaryFile("w", suffix=".env") as file:
        file.write(found[1])
        file.flush()
        env = load_env(BootEnv, file.name, environ={})
    wanted = [f"install -m 0644 /dev/stdin {path} <<'KCP_BOOT_EOF'\n{unit}" for path, unit in
              boot.refresh_units(env).items()] + [f"systemctl enable --now {boot.REFRESH}.timer\n"]
    return [w.splitlines()[0] for w in wanted if w not in script]


@pytest.mark.parametrize("provider", boot.PROVIDERS)
def test_every_boot_installs_and_starts_the_refresh_timer(provider: str) -> None:
    """Every 5 minutes, spread by a minute; only after the boot path succeeded; the agent's `cloud-refresh`."""
    env = BootEnv(**{**vars(ENV), "provider": provider})
    script = boot.boot_script(env)
    assert refresh_problems(script) == []
    service, timer = boot.refresh_units(env).values()
    assert f"ExecStart={AGENT} cloud-refresh\n" in service and "Type=oneshot\n" in service
    assert "Requisite=kcp-boot.service\nAfter=kcp-boot.service\n" in service, "a failed boot is not refreshed"
    assert "OnActiveSec=300\nOnUnitInactiveSec=300\nRandomizedDelaySec=60\n" in timer
    assert "WantedBy=timers.target" in timer


def test_bootstrap_unpacks_in_the_bundle_format_and_hands_over_to_the_agent() -> None:
    text = boot.BOOTSTRAP.read_text()
    assert UNPACK_BUNDLE.split(" | ", 1)[1] in text and "base64 -d |" in text
    assert f"exec {AGENT} cloud-boot\n" in text
    if shutil.which("shellcheck"):
        subprocess.run(["shellcheck", str(boot.BOOTSTRAP)], check=True)


@pytest.mark.parametrize("provider", boot.PROVIDERS)
def test_boot_script_is_valid_bash(provider: str) -> None:
    script = boot.boot_script(BootEnv(**{**vars(ENV), "provider": provider}))
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)


def test_boot_env_is_what_the_agent_reads_and_what_the_bootstrap_sources(tmp_path: Path) -> None:
    odd = BootEnv(**{**vars(ENV), "cluster": "it's $HOME `x`"})
    env = tmp_path / "boot.env"
    env.write_text(BOOT_ENV_FILE.search(boot.boot_script(odd))[1])
    assert load_env(BootEnv, str(env), environ={}) == odd
    out = subprocess.run(["bash", "-c", f'. {env}; printf "%s|%s" "$KCP_BOOT_CLUSTER" "$KCP_BOOT_PROGRAMS_SECRETS"'],
                         capture_output=True, text=True, check=True).stdout
    assert out == "it's $HOME `x`|prod-host-programs,prod-host-programs-2"


@pytest.mark.parametrize(("env", "limit"), [(BootEnv(**{**vars(ENV), "provider": "azure"}), None),
                                            (BootEnv(**{**vars(ENV), "cluster": "x" * AWS_USER_DATA_MAX}),
                                             AWS_USER_DATA_MAX)])
def test_boot_script_refuses_what_it_cannot_ship(env: BootEnv, limit: int | None) -> None:
    with pytest.raises(ValueError):
        boot.boot_script(env, limit)


def test_aws_boot_script_fits_user_data_with_room_to_grow() -> None:
    script = boot.boot_script(ENV)
    assert len(gzip.compress(script.encode())) < AWS_USER_DATA_MAX / 4, "gzip'd user data is close to 16 KiB"
    assert len(script.encode()) < AWS_USER_DATA_MAX / 2, "the script itself should stay small"


@pytest.mark.parametrize("stack", ["gce-example", "aws-example"])
def test_declared_boot_scripts_carry_settings_the_agent_reads_and_no_secret(declared, stack: str,
                                                                          tmp_path: Path) -> None:
    program = declared(stack)
    if stack.startswith("gce"):
        scripts = [t.inputs["metadata"]["startup-script"]
                   for t in program.of_type("gcp:compute/instanceTemplate:InstanceTemplate")]
        secrets = [s.inputs["secretId"] for s in program.of_type("gcp:secretmanager/secret:Secret")]
    else:
        scripts = [gzip.decompress(base64.b64decode(t.inputs["userData"])).decode()
                   for t in program.of_type("aws:ec2/launchTemplate:LaunchTemplate")]
        secrets = [s.inputs["name"] for s in program.of_type("aws:secretsmanager/secret:Secret")]
    assert len(scripts) == 2, "one template for the members, one for the API servers"
    for script in scripts:
        assert "PRIVATE KEY" not in script and not re.search(r"[A-Za-z0-9+/=]{400,}", script), "a secret?"
        path = tmp_path / "boot.env"
        path.write_text(BOOT_ENV_FILE.search(script)[1])
        env = load_env(BootEnv, str(path), environ={})
        assert env.provider == stack[:3] and set(env.programs_secrets) == {s for s in secrets if "host-programs" in s}


def _bundle_files(payload: str) -> dict[str, str]:
    with tarfile.open(fileobj=io.BytesIO(base64.b64decode(payload))) as tar:
        return {m.name: tar.extractfile(m).read().decode() for m in tar.getmembers()}  # type: ignore[union-attr]


@pytest.mark.parametrize("stack", ["gce-example", "aws-five"])
def test_slot_bundles_carry_the_releases_so_a_version_change_reaches_running_machines(declared, stack: str,
                                                                                      tmp_path: Path) -> None:
    """Releases are in the bundle that `cloud-refresh` re-fetches, not in the boot settings it never reads again."""
    cfg = _cfg(stack)
    kind, field = (("gcp:secretmanager/secretVersion:SecretVersion", "secretData") if stack.startswith("gce")
                   else ("aws:secretsmanager/secretVersion:SecretVersion", "secretString"))
    bundles = {v.name.removesuffix("-secret-version"): plain(v.inputs[field]) for v in declared(stack).of_type(kind)
               if "host-programs" not in v.name}
    from components.topology import plan
    assert set(bundles) == {s.name for s in cloud.slots(cfg, plan(cfg))}
    for name, payload in bundles.items():
        files, path = _bundle_files(payload), tmp_path / name
        path.write_text(files[SlotEnv.PATH.lstrip("/")])
        slot = load_env(SlotEnv, str(path), environ={})
        assert slot.name == name
        assert slot.etcd_install == ("release", cfg.etcd.version, ETCD_SHA256["amd64"][cfg.etcd.version]), name
        api = name.endswith("-api")
        assert slot.kubelet_install == (tuple(kubelet_release_args(cfg.kubernetes_version).split()) if api else ())
        assert bool(slot.etcd_endpoints) == api and len(slot.etcd_client) == (3 if api else 0), name
        if api:  # the lock's etcd client is kube-apiserver's own
            manifest = files["etc/kubernetes/manifests/kube-apiserver.yaml"]
            assert f"--etcd-servers={','.join(slot.etcd_endpoints)}" in manifest
            assert all(f.lstrip("/") in files and f"={f}" in manifest for f in slot.etcd_client), slot.etcd_client
            assert "--etcd-compaction-interval=0" in manifest, "the delta log's archiver compacts etcd instead"
        else:  # the delta log to the bucket, started by cloud-boot and cloud-refresh where its unit is
            (tmp_path / "backup.env").write_text(files[BackupEnv.PATH.lstrip("/")])
            backup = load_env(BackupEnv, str(tmp_path / "backup.env"), environ={})
            assert backup.delta_seconds == cfg.backup.delta_seconds and backup.dest[:5] in ("gs://", "s3://"), backup
            assert f"ExecStart={AGENT} etcd-delta-archive\n" in files[DELTA_UNIT_FILE.lstrip("/")]
        # members a shrink deletes leave etcd within a minute, not at the next refresh (an API server runs no etcd)
        watch = {path.lstrip("/"): unit for path, unit in boot.membership_units().items()}
        assert {f: files[f] for f in watch if f in files} == ({} if api else watch), name


def test_the_membership_watch_runs_every_30_seconds_and_only_acts_on_a_silent_voter() -> None:
    service, timer = boot.membership_units().values()
    assert f"ExecStart={AGENT} cloud-refresh --membership\n" in service and "Type=oneshot\n" in service
    assert "OnActiveSec=30\nOnUnitInactiveSec=30\n" in timer and "WantedBy=timers.target" in timer
    assert list(boot.membership_units())[1] == MEMBERSHIP_TIMER_FILE, "the path the agent enables it by"


def test_host_programs_are_the_agent_alone_in_pieces_that_each_fit_a_secret() -> None:
    parts = cloud.programs_parts()
    assert "".join(parts) == bundle(agent_files()), "the pieces join to the bundle"
    assert all(len(p) <= cloud.SECRET_MAX_BYTES and len(p) % 4 == 0 for p in parts[:-1])
    assert len(parts[-1]) <= cloud.SECRET_MAX_BYTES
    assert len(parts) <= 2, "the agent outgrew two secrets: check what grew"
    assert cloud.programs_secrets("prod") == ["prod-host-programs", *(f"prod-host-programs-{i}"
                                                                       for i in range(2, len(parts) + 1))]
    assert [(f.path, f.mode) for f in agent_files()] == [(AGENT, 0o755)]


def _mount_namespaces() -> bool:
    return os.geteuid() == 0 and shutil.which("unshare") is not None and subprocess.run(
        ["unshare", "-m", "true"], capture_output=True, check=False).returncode == 0


@pytest.mark.skipif(not _mount_namespaces(), reason="needs root and a private mount namespace")
def test_bootstrap_joins_the_pieces_unpacks_them_and_hands_over_to_the_agent(tmp_path: Path) -> None:
    """The real bootstrap in a private mount namespace, where /usr/local/lib is an empty tmpfs and gcloud a
    stand-in serving the pieces of a bundle whose kcp-host only tells that it ran."""
    payload = bundle([HostFile(AGENT, '#!/bin/sh\necho "handed over: $*"\n', 0o755)])
    cut = len(payload) // 8 * 4
    (tmp_path / "p1").write_text(payload[:cut])
    (tmp_path / "p2").write_text(payload[cut:] + "\n")
    gcloud = tmp_path / "bin" / "gcloud"
    gcloud.parent.mkdir()
    gcloud.write_text('#!/bin/sh\necho "$*" >>"$STAND_IN/calls"\n'
                      'for a; do case $a in --secret=*) cat "$STAND_IN/${a#--secret=}" ;; esac; done\n')
    gcloud.chmod(0o755)
    env = tmp_path / "boot.env"
    env.write_text(render_env(BootEnv(**{**vars(ENV), "provider": "gce", "programs_secrets": ("p1", "p2"),
                                         "gce_project": "proj"}), "test"))
    proc = subprocess.run(
        ["unshare", "-m", "sh", "-c", f"mount -t tmpfs none /usr/local/lib && exec {boot.BOOTSTRAP}"],
        env={**os.environ, "PATH": f"{gcloud.parent}:{os.environ['PATH']}", "KCP_BOOT_ENV": str(env),
             "STAND_IN": str(tmp_path)}, capture_output=True, text=True, timeout=60, check=False)
    assert proc.stdout == "handed over: cloud-boot\n", proc.stderr
    assert (tmp_path / "calls").read_text().splitlines() == [
        f"secrets versions access latest --secret={p} --project=proj --quiet" for p in ("p1", "p2")]


def test_slots_name_one_secret_per_member_and_one_for_the_api_group() -> None:
    cfg = _cfg("gce-five")
    from components.topology import plan
    names = [s.name for s in cloud.slots(cfg, plan(cfg))]
    assert names == [f"prod5-etcd-{i}" for i in range(5)] + ["prod5-api"]
    colocated = cfg.model_copy(update={"etcd": cfg.etcd.model_copy(update={"placement": "colocated", "members": 3})})
    slots = cloud.slots(colocated, plan(colocated))
    assert [s.roles for s in slots] == [("etcd", "apiserver")] * 3


def test_retention_keeps_every_snapshot_of_the_locked_days_and_never_the_marker() -> None:
    """Snapshots go under new keys and are locked for `retain.daily` days (or longer when `retain.recent` snapshots
    at the interval span more): expiry is one age rule a day past the lock, so nothing a host uploads can push an
    older snapshot out."""
    cfg = _cfg("aws-example")
    assert cloud.lock_days(cfg) == cfg.backup.retain.daily == 7
    assert cloud.retention_rules(cfg) == [cloud.ExpiryRule("prod/backups/", 8)]
    slow = cfg.model_copy(update={"backup": cfg.backup.model_copy(update={"interval_minutes": 1440})})
    assert cloud.lock_days(slow) == 7 and cloud.lock_days(slow.model_copy(update={"backup": slow.backup.model_copy(
        update={"retain": slow.backup.retain.model_copy(update={"recent": 10})})})) == 10
    assert not any("cluster-formed" in r.prefix for r in cloud.retention_rules(cfg)), "the marker never expires"


def _methods(cls: type) -> list[str]:
    return [name for name, value in vars(cls).items() if callable(value) and not name.startswith("__")]


def test_gce_and_aws_targets_have_the_same_shape() -> None:
    assert _methods(GceTarget) == _methods(AwsTarget)
    assert _methods(GceTarget)[0] == "endpoints"
    assert GceTarget.deploy is AwsTarget.deploy, "both clouds declare in the one order of cloud.CloudTarget"


COLOCATED = {"gce-example": {"members": 3, "placement": "colocated", "disk": "persistent", "version": "3.5.33"},
             "aws-five": {"members": 3, "placement": "colocated", "disk": "local", "version": "3.6.14"}}


@pytest.mark.parametrize("stack", sorted(COLOCATED))
def test_colocated_members_serve_the_api_behind_its_load_balancer(declared, stack: str) -> None:
    program = declared(stack, etcd=COLOCATED[stack])
    c = stack_config(ROOT / "stacks" / f"Pulumi.{stack}.yaml")["clusterName"]
    if stack.startswith("gce"):
        (api,) = [b for b in program.of_type("gcp:compute/regionBackendService:RegionBackendService")
                  if b.inputs["loadBalancingScheme"] == "EXTERNAL"]
        assert len(api.inputs["backends"]) == 3, f"{api.name}: the member groups are the API backends"
        assert not program.of_type("gcp:compute/regionInstanceGroupManager:RegionInstanceGroupManager")
    else:
        for group in program.of_type("aws:autoscaling/group:Group"):
            assert f"arn:aws:mock:::{c}-api-tg" in group.inputs["targetGroupArns"], f"{group.name} serves no API"
        assert len(program.of_type("aws:autoscaling/group:Group")) == 3


def test_existing_networks_are_used_not_created(declared) -> None:
    gce = declared("gce-five", gce={"project": "my-project", "region": "us-central1", "network": "shared",
                                    "subnetwork": "cp"})
    assert not gce.of_type("gcp:compute/network:Network") and not gce.of_type("gcp:compute/subnetwork:Subnetwork")
    subnets = ["subnet-0123456789abcdef0", "subnet-0123456789abcdef1", "subnet-0123456789abcdef2"]
    aws = declared("aws-example", aws={"region": "eu-west-1", "publicApi": False, "subnetIds": subnets})
    assert not aws.of_type("aws:ec2/vpc:Vpc") and not aws.of_type("aws:ec2/natGateway:NatGateway")
    assert aws.named("prod-etcd-0-interface").inputs["subnetId"] == subnets[0]
    assert aws.named("prod-api-nlb").inputs["internal"] is True
