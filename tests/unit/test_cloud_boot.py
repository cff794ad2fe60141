"""Policies of what GCE and AWS share: the rendered boot path, bundles, retention, and one shape.

The boot script must carry the repository's programs byte for byte, no secret, and fit the
cloud's limit; both target classes must expose the same methods in the same order, so a
reader compares them line by line.
"""

from __future__ import annotations

import gzip
import subprocess

import pytest

from components.config import ClusterConfig
from components.render import boot
from components.render.hostfiles import UNPACK_BUNDLE
from components.targets import cloud
from components.targets.aws import AwsTarget
from components.targets.gce import GceTarget
from components.validation import load
from tests.program import ROOT, stack_config

AWS_USER_DATA_MAX = 16_384


def _cfg(stack: str) -> ClusterConfig:
    return load(stack_config(ROOT / "stacks" / f"Pulumi.{stack}.yaml"))


@pytest.mark.parametrize("provider", boot.PROVIDERS)
def test_boot_script_carries_the_repository_programs_unchanged(provider: str) -> None:
    script = boot.boot_script(provider, {"KCP_BOOT_ROLES": "etcd"})
    for name in ("cloud-boot", f"cloud-boot-{provider}.sh"):
        assert (boot.HOST_SCRIPTS / name).read_text() in script, f"{name} is not embedded verbatim"
    assert f"KCP_BOOT_PROVIDER={provider}\n" in script
    assert "systemctl enable kcp-boot.service" in script


@pytest.mark.parametrize("provider", boot.PROVIDERS)
def test_boot_script_is_valid_bash(provider: str) -> None:
    script = boot.boot_script(provider, {"KCP_BOOT_ROLES": "etcd apiserver"})
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)


def test_boot_env_values_survive_the_shell_and_unpack_matches_the_bundle_format(tmp_path) -> None:
    env = tmp_path / "boot.env"
    env.write_text(boot.boot_env({"KCP_BOOT_ROLES": "etcd apiserver", "KCP_BOOT_ODD": "it's $HOME `x`"}))
    out = subprocess.run(["bash", "-c", f'. {env}; printf "%s|%s|%s" "$KCP_BOOT_ROLES" "$KCP_BOOT_ODD" '
                          '"$KCP_BOOT_UNPACK"'], capture_output=True, text=True, check=True).stdout
    assert out == f"etcd apiserver|it's $HOME `x`|{UNPACK_BUNDLE}"


@pytest.mark.parametrize(("provider", "settings", "limit"), [
    ("azure", {}, None),
    ("gce", {"PATH": "/tmp"}, None),
    ("aws", {"KCP_BOOT_BIG": "x" * AWS_USER_DATA_MAX}, AWS_USER_DATA_MAX),
])
def test_boot_script_refuses_what_it_cannot_ship(provider: str, settings: dict[str, str], limit: int | None) -> None:
    with pytest.raises(ValueError):
        boot.boot_script(provider, settings, limit)


def test_aws_boot_script_fits_user_data_with_room_to_grow() -> None:
    script = boot.boot_script("aws", {"KCP_BOOT_ROLES": "etcd", "KCP_BOOT_MARKER": "s3://" + "b" * 63 + "/k"})
    assert len(gzip.compress(script.encode())) < AWS_USER_DATA_MAX / 2, "gzip'd user data is close to 16 KiB"


def test_every_host_program_ships_executable_and_fits_a_secret() -> None:
    files = boot.host_program_files()
    names = {f.path.rsplit("/", 1)[1] for f in files}
    assert {"cloud-boot", "cloud-boot-gce.sh", "cloud-boot-aws.sh", "etcd-member-recovery", "etcd-install"} <= names
    assert all(f.mode == 0o755 and f.path.startswith("/usr/local/lib/kcp/") for f in files)
    assert len(cloud.checked_bundle("host-programs", files)) < cloud.SECRET_MAX_BYTES


def test_slots_name_one_secret_per_member_and_one_for_the_api_group() -> None:
    cfg = _cfg("gce-five")
    from components.topology import plan
    names = [s.name for s in cloud.slots(cfg, plan(cfg))]
    assert names == [f"prod5-etcd-{i}" for i in range(5)] + ["prod5-api"]
    colocated = cfg.model_copy(update={"etcd": cfg.etcd.model_copy(update={"placement": "colocated", "members": 3})})
    slots = cloud.slots(colocated, plan(colocated))
    assert [s.roles for s in slots] == [("etcd", "apiserver")] * 3


def test_retention_keeps_exactly_the_configured_counts() -> None:
    rules = {r.prefix: r for r in cloud.retention_rules(_cfg("aws-example"))}
    assert rules["prod/backups/recent/"].keep_versions == 6 and rules["prod/backups/daily/"].keep_versions == 7
    assert rules["prod/backups/daily-markers/"].expire_days == 8
    assert all(not r.prefix.startswith("prod/cluster-formed") for r in rules.values()), "the marker never expires"


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
