"""Policies of the AWS target, on what the program declares for every shipped AWS stack (issue 8).

Each stack is declared once per test session (the `declared` fixture caches it); every test
names the resource it found at fault.
"""

from __future__ import annotations

import base64
import gzip
import json
import math
import re
from collections import Counter
from typing import Any

import pytest

from components.render.etcd import CLIENT_PORT, METRICS_PORT, PEER_PORT
from components.render.kubernetes import API_PORT
from components.topology import quorum
from tests.conftest import ALL_STACKS
from tests.integration.realtls import SECRET_SIG
from tests.program import ROOT, Declared, Program, stack_config
from tests.unit.test_cloud_boot import refresh_problems

AWS_STACKS = [s for s in ALL_STACKS if stack_config(ROOT / "stacks" / f"Pulumi.{s}.yaml")["target"] == "aws"]
ASG, TG, TEMPLATE = "aws:autoscaling/group:Group", "aws:lb/targetGroup:TargetGroup", \
    "aws:ec2/launchTemplate:LaunchTemplate"
INGRESS, POLICY = "aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule", "aws:iam/rolePolicy:RolePolicy"
SUBNET = "aws:ec2/subnet:Subnet"


@pytest.fixture(params=AWS_STACKS)
def stack(request: pytest.FixtureRequest, declared) -> tuple[dict[str, Any], Program]:
    name = request.param
    return stack_config(ROOT / "stacks" / f"Pulumi.{name}.yaml"), declared(name)


def _zone_of_subnet(program: Program, subnet_id: str) -> str:
    (subnet,) = [s for s in program.of_type(SUBNET) if f"{s.name}-id" == subnet_id]
    return subnet.inputs["availabilityZone"]


def _policy(program: Program, kind: str) -> list[dict[str, Any]]:
    doc = next(p for p in program.of_type(POLICY) if p.name.endswith(f"-policy-{kind}")).inputs["policy"]
    return json.loads(doc)["Statement"]


def test_aws_stacks_are_tested() -> None:
    assert set(AWS_STACKS) >= {"aws-example", "aws-five"}


def test_every_group_is_replaced_on_its_load_balancer_check_after_a_boot_sized_grace(stack) -> None:
    cfg, program = stack
    groups = program.of_type(ASG)
    assert len(groups) == cfg["etcd"]["members"] + 1, "one group per member and one for the API servers"
    for group in groups:
        assert group.inputs["healthCheckType"] == "ELB", f"{group.name}: {group.inputs['healthCheckType']}"
        assert group.inputs["healthCheckGracePeriod"] >= 600, f"{group.name}: grace shorter than a boot"
        assert group.inputs["targetGroupArns"], f"{group.name}: no load balancer check to act on"


def test_api_target_group_checks_https_readyz_on_6443(stack) -> None:
    cfg, program = stack
    (api,) = [g for g in program.of_type(ASG) if g.name == f"{cfg['clusterName']}-api-group"]
    tg = program.named(f"{cfg['clusterName']}-api-tg")
    assert api.inputs["targetGroupArns"] == [f"arn:aws:mock:::{tg.name}"], api.name
    check = tg.inputs["healthCheck"]
    assert (check["protocol"], check["port"], check["path"]) == ("HTTPS", str(API_PORT), "/readyz"), tg.name
    assert tg.inputs["port"] == API_PORT and tg.inputs["protocol"] == "TCP", tg.name


def test_etcd_target_group_is_sticky_by_source_ip_and_checks_health(stack) -> None:
    cfg, program = stack
    tg = program.named(f"{cfg['clusterName']}-etcd-tg")
    assert tg.inputs["stickiness"] == {"type": "source_ip", "enabled": True}, f"{tg.name}: not sticky"
    check = tg.inputs["healthCheck"]
    assert (check["protocol"], check["port"], check["path"]) == ("HTTP", str(METRICS_PORT), "/health"), tg.name
    for lb in program.of_type("aws:lb/loadBalancer:LoadBalancer"):
        assert lb.inputs["enableCrossZoneLoadBalancing"], f"{lb.name}: cross-zone off"
    assert program.named(f"{cfg['clusterName']}-etcd-nlb").inputs["internal"], "etcd NLB must be internal"


def test_one_zone_lost_leaves_an_etcd_quorum_and_an_api_server(stack) -> None:
    cfg, program = stack
    members = [g for g in program.of_type(ASG) if g.name != f"{cfg['clusterName']}-api-group"]
    zones = Counter()
    for group in members:
        (subnet,) = group.inputs["vpcZoneIdentifiers"]
        zones[_zone_of_subnet(program, subnet)] += 1
        assert group.inputs["maxSize"] == 1, f"{group.name}: a member group must never hold two instances"
    for zone, n in zones.items():
        assert len(members) - n >= quorum(len(members)), f"losing {zone} loses etcd quorum"
    api = program.named(f"{cfg['clusterName']}-api-group")
    api_zones = {_zone_of_subnet(program, s) for s in api.inputs["vpcZoneIdentifiers"]}
    size = api.inputs["desiredCapacity"]
    assert len(api_zones) >= 2 and size - -(-size // len(api_zones)) >= 1, f"{api.name}: {size} over {api_zones}"


def test_a_template_change_never_takes_two_etcd_members_down_at_once(stack) -> None:
    """A new launch template version replaces no member: member groups (one instance, no surge) have no instance
    refresh, so changes reach members by `cloud-refresh`, one at a time. The API group refreshes rolling, never
    below 100 % healthy."""
    cfg, program = stack
    api = f"{cfg['clusterName']}-api-group"
    for group in program.of_type(ASG):
        if group.name == api:
            refresh = group.inputs["instanceRefresh"]
            assert refresh["strategy"] == "Rolling", f"{group.name}: {refresh}"
            assert refresh["preferences"]["minHealthyPercentage"] == 100, f"{group.name}: {refresh}"
            continue
        assert "instanceRefresh" not in group.inputs, f"{group.name}: a member group refreshes on a template change"
        assert (group.inputs["minSize"], group.inputs["maxSize"], group.inputs["desiredCapacity"]) == (1, 1, 1), \
            f"{group.name}: more than its one instance"
        assert group.inputs["instanceMaintenancePolicy"]["maxHealthyPercentage"] == 100, f"{group.name}: surges"


def test_every_cloud_machine_runs_the_bundle_refresh_timer(stack) -> None:
    """Every group launches from a template whose user data installs and starts the refresh timer."""
    program = stack[1]
    templates = {t.urn: gzip.decompress(base64.b64decode(t.inputs["userData"])).decode()
                 for t in program.of_type(TEMPLATE)}
    for group in program.of_type(ASG):
        (template,) = group.property_dependencies["launchTemplate"]
        assert refresh_problems(templates[template]) == [], group.name


def test_instances_require_imdsv2_and_encrypt_their_root_volume(stack) -> None:
    for template in stack[1].of_type(TEMPLATE):
        meta = template.inputs["metadataOptions"]
        assert meta["httpTokens"] == "required" and meta["httpPutResponseHopLimit"] == 1, f"{template.name}: IMDSv1"
        for device in template.inputs["blockDeviceMappings"]:
            assert device["ebs"]["encrypted"] == "true", f"{template.name}: unencrypted {device['deviceName']}"
        assert "associatePublicIpAddress" not in json.dumps(template.inputs), f"{template.name}: public address"


def _rules(program: Program) -> list[Declared]:
    return program.of_type(INGRESS)


def _sources(program: Program, group: str, port: int) -> set[str]:
    """Sources allowed to `port` on security group `<cluster>-<group>` (CIDRs, or referenced group names)."""
    out = set()
    for rule in _rules(program):
        i = rule.inputs
        if i["securityGroupId"] == f"{group}-sg-id" and i["fromPort"] <= port <= i["toPort"]:
            out.add(i.get("cidrIpv4") or i["referencedSecurityGroupId"].removesuffix("-sg-id"))
    return out


def test_api_port_open_to_admins_and_cluster_hosts_at_the_nlb_and_to_the_nlb_only_at_servers(stack) -> None:
    cfg, program = stack
    c = cfg["clusterName"]
    assert _sources(program, f"{c}-api-lb", API_PORT) == set(cfg["network"]["adminCidrs"]) | {"198.51.100.10/32"}
    assert _sources(program, f"{c}-apiserver", API_PORT) == {f"{c}-api-lb"}


def test_etcd_client_port_only_from_api_servers_members_and_their_nlb(stack) -> None:
    c = stack[0]["clusterName"]
    assert _sources(stack[1], f"{c}-etcd", CLIENT_PORT) == {f"{c}-apiserver", f"{c}-etcd", f"{c}-etcd-lb"}
    assert _sources(stack[1], f"{c}-etcd-lb", CLIENT_PORT) == {f"{c}-apiserver", f"{c}-etcd"}


def test_etcd_peer_port_only_within_the_etcd_group(stack) -> None:
    c = stack[0]["clusterName"]
    assert _sources(stack[1], f"{c}-etcd", PEER_PORT) == {f"{c}-etcd"}


def test_etcd_health_port_only_from_its_nlb(stack) -> None:
    c = stack[0]["clusterName"]
    assert _sources(stack[1], f"{c}-etcd", METRICS_PORT) == {f"{c}-etcd-lb"}


def test_no_rule_opens_etcd_ports_to_an_address_range_or_anything_to_everyone(stack) -> None:
    cfg, program = stack
    for rule in _rules(program):
        i = rule.inputs
        assert i["ipProtocol"] == "tcp" and i["fromPort"] == i["toPort"], f"{rule.name}: a port range"
        if i["fromPort"] in (CLIENT_PORT, PEER_PORT):
            assert "cidrIpv4" not in i, f"{rule.name} opens etcd to {i['cidrIpv4']}"
        if i.get("cidrIpv4") == "0.0.0.0/0":
            assert "0.0.0.0/0" in cfg["network"]["adminCidrs"], f"{rule.name} is open to the internet"
    assert not program.of_type("aws:ec2/securityGroupRule:SecurityGroupRule")


def _writes(statement: dict[str, Any]) -> list[str]:
    actions = statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
    return [a for a in actions if not re.match(r"^[a-z0-9]+:(Describe|Get|List|Head)", a)]


def test_no_write_action_on_a_wildcard_resource(stack) -> None:
    for policy in stack[1].of_type(POLICY):
        for statement in json.loads(policy.inputs["policy"])["Statement"]:
            resources = statement["Resource"] if isinstance(statement["Resource"], list) else [statement["Resource"]]
            if _writes(statement):
                assert "*" not in resources, f"{policy.name}: {_writes(statement)} on *"
                for arn in resources:
                    assert not arn.endswith("/*") or "Condition" in statement or ":s3:::" in arn, \
                        f"{policy.name}: {arn} unscoped"


def test_instances_attach_only_their_own_volumes_and_interfaces(stack) -> None:
    cfg, program = stack
    c, members = cfg["clusterName"], [f"{cfg['clusterName']}-etcd-{i}" for i in range(cfg["etcd"]["members"])]
    by_action: dict[str, list[Any]] = {}
    for statement in _policy(program, "attach-own-disk-and-address"):
        for action in _writes(statement):
            by_action.setdefault(action, []).append(statement)
    interfaces = {f"arn:aws:mock:::{m}-interface" for m in members}
    assert any(set(s["Resource"]) == interfaces for s in by_action["ec2:AttachNetworkInterface"])
    if cfg["etcd"]["disk"] == "persistent":
        volumes = {f"arn:aws:mock:::{m}-data" for m in members}
        assert any(set(s["Resource"]) == volumes for s in by_action["ec2:AttachVolume"])
    else:
        assert "ec2:AttachVolume" not in by_action, "local disk mode attaches no volume"
    for statements in by_action.values():
        for s in statements:
            if s["Resource"] == f"arn:aws:ec2:{cfg['aws']['region']}:123456789012:instance/*":
                assert s["Condition"] == {"StringEquals": {"aws:ResourceTag/kcp-cluster": c}}, s


def test_instances_read_only_their_secrets(stack) -> None:
    """Which role reads which secret: tests/unit/test_cloud_identities.py. Here: each role's read policy names exact
    secrets of this cluster, and the key decrypts, through Secrets Manager only, exactly those."""
    program = stack[1]
    secrets = {f"arn:aws:mock:::{s.name}" for s in program.of_type("aws:secretsmanager/secret:Secret")}
    policies = [p for p in program.of_type(POLICY) if p.name.endswith("-policy-read-secrets")]
    assert len(policies) == 2, f"one read policy per role: {[p.name for p in policies]}"
    for policy in policies:
        (read, decrypt) = json.loads(policy.inputs["policy"])["Statement"]
        assert read["Action"] == "secretsmanager:GetSecretValue" and set(read["Resource"]) < secrets, policy.name
        condition = decrypt["Condition"]["StringEquals"]
        assert condition["kms:ViaService"].startswith("secretsmanager."), f"{policy.name}: {decrypt}"
        assert condition["kms:EncryptionContext:SecretARN"] == read["Resource"], f"{policy.name}: {decrypt}"
    for secret in program.of_type("aws:secretsmanager/secret:Secret"):
        assert secret.inputs["kmsKeyId"].endswith("-kms"), f"{secret.name}: not under the cluster key"
    for version in program.of_type("aws:secretsmanager/secretVersion:SecretVersion"):
        if "host-programs" not in version.name:
            assert SECRET_SIG in version.inputs["secretString"], f"{version.name}: bundle is not a Pulumi secret"


def test_instances_may_only_add_backups_under_their_prefix(stack) -> None:
    cfg, program = stack
    c = cfg["clusterName"]
    statements = _policy(program, "write-backups")
    puts = [s for s in statements if s["Action"] == "s3:PutObject"]
    assert len(puts) == 1 and sorted(puts[0]["Resource"]) == sorted([
        f"arn:aws:s3:::{c}-etcd-backups/{c}/backups/*", f"arn:aws:s3:::{c}-etcd-backups/{c}/cluster-formed"])
    actions = {a for s in statements for a in ([s["Action"]] if isinstance(s["Action"], str) else s["Action"])}
    assert not {a for a in actions if "Delete" in a}, f"delete granted: {actions}"


def _s3(statements: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [s for s in statements if any(a.startswith("s3:") for a in _actions(s))]


def _actions(statement: dict[str, Any]) -> list[str]:
    return [statement["Action"]] if isinstance(statement["Action"], str) else statement["Action"]


def test_instances_read_and_list_only_the_marker_and_the_delta_logs_chunks(stack) -> None:
    """Beyond adding backups: HeadObject (GetObject) and list of the cluster-formed marker and of the delta log's
    chunks, which the archiver needs to resume its log; never a read or list of snapshots or anything else."""
    cfg, program = stack
    c = cfg["clusterName"]
    bucket, marker, deltas = f"arn:aws:s3:::{c}-etcd-backups", f"{c}/cluster-formed", f"{c}/backups/deltas"
    statements = _s3(_policy(program, "write-backups"))
    assert {a for s in statements for a in _actions(s)} == {"s3:PutObject", "s3:GetObject", "s3:ListBucket"}, \
        statements
    assert all(s["Effect"] == "Allow" and len(_actions(s)) == 1 for s in statements), statements
    gets = [s for s in statements if s["Action"] == "s3:GetObject"]
    assert sorted(s["Resource"] for s in gets) == sorted([f"{bucket}/{marker}", f"{bucket}/{deltas}/*"]), gets
    assert all("Condition" not in s for s in gets), gets
    lists = [s for s in statements if s["Action"] == "s3:ListBucket"]
    assert all(s["Resource"] == bucket for s in lists), lists
    assert sorted(json.dumps(s["Condition"], sort_keys=True) for s in lists) == sorted([
        json.dumps({"StringEquals": {"s3:prefix": marker}}),
        json.dumps({"StringLike": {"s3:prefix": f"{deltas}/*"}})]), lists
    for s in gets + lists:
        for arn in ([s["Resource"]] if isinstance(s["Resource"], str) else s["Resource"]):
            assert "/snapshots" not in arn and arn != f"{bucket}/{c}/backups/*", f"reads beyond the log: {s}"


def test_no_one_writes_a_delta_chunk_but_create_only(stack) -> None:
    """The bucket policy refuses every PutObject below the delta log's prefix that lacks If-None-Match (S3's
    conditional write), whoever sends it, so no chunk is written over another, not even a new version of one."""
    c = stack[0]["clusterName"]
    statements = json.loads(stack[1].named(f"{c}-etcd-backups-tls-only").inputs["policy"])["Statement"]
    (deny,) = [s for s in statements if s.get("Sid") == "DeltaChunksCreateOnly"]
    assert deny == {"Sid": "DeltaChunksCreateOnly", "Effect": "Deny", "Principal": "*", "Action": "s3:PutObject",
                    "Resource": f"arn:aws:s3:::{c}-etcd-backups/{c}/backups/deltas/*",
                    "Condition": {"Null": {"s3:if-none-match": "true"}}}, deny
    assert {s.get("Sid") for s in statements} == {"TlsOnly", "OnlyEtcdMembersWriteBackups", "DeltaChunksCreateOnly"}
    assert all(s["Effect"] == "Deny" for s in statements), "the bucket policy only ever refuses"


def test_no_secret_in_user_data(stack) -> None:
    cfg, program = stack
    encryption_key = program.outputs[f"{cfg['clusterName']}-secrets-encryption-key"]["base64"]
    for template in program.of_type(TEMPLATE):
        assert isinstance(template.inputs["userData"], str), f"{template.name}: user data is a secret?"
        packed = base64.b64decode(template.inputs["userData"])
        assert len(packed) <= 16_384, f"{template.name}: over the user data limit"
        script = gzip.decompress(packed).decode()
        assert script.startswith("#!"), f"{template.name}: user data is not a script"
        assert "PRIVATE KEY" not in script and encryption_key not in script, f"{template.name}: key in user data"
        assert not re.search(r"[A-Za-z0-9+/=]{400,}", script), f"{template.name}: a bundle-sized blob in user data"


def _lock_days(cfg: dict[str, Any]) -> int:
    """docs/backups.md: the daily history, `recent` snapshots at the interval, at least a day."""
    backup = cfg.get("backup", {})
    retain = {"recent": 6, "daily": 7} | backup.get("retain", {})
    return max(retain["daily"], math.ceil(retain["recent"] * backup.get("intervalMinutes", 30) / 1440), 1)


def test_backup_bucket_is_locked_private_kms_encrypted_and_expires_by_age(stack) -> None:
    """Object Lock (governance) keeps every version for the lock period, so no upload over a key and no lifecycle
    rule removes history sooner; the lifecycle deletes by age after it."""
    cfg, program = stack
    c, days = cfg["clusterName"], _lock_days(cfg)
    assert days >= max(1, cfg.get("backup", {}).get("retain", {}).get("daily", 7))
    versioning = program.named(f"{c}-etcd-backups-versioning")
    assert versioning.inputs["versioningConfiguration"]["status"] == "Enabled"
    lock = program.named(f"{c}-etcd-backups-lock")
    assert lock.inputs["objectLockEnabled"] == "Enabled" and lock.inputs["rule"] == {
        "defaultRetention": {"mode": "GOVERNANCE", "days": days}}, lock.inputs
    assert versioning.urn in lock.dependencies, "Object Lock needs versioning first"
    (bucket,) = program.of_type("aws:s3/bucket:Bucket")
    assert "objectLockEnabled" not in bucket.inputs, "that would replace an existing bucket, and its history with it"
    block = program.named(f"{c}-etcd-backups-public-access").inputs
    assert all(block[k] for k in ("blockPublicAcls", "blockPublicPolicy", "ignorePublicAcls",
                                  "restrictPublicBuckets")), block
    (rule,) = program.named(f"{c}-etcd-backups-encryption").inputs["rules"]
    assert rule["applyServerSideEncryptionByDefault"]["sseAlgorithm"] == "aws:kms", rule
    (expiry,) = program.named(f"{c}-etcd-backups-lifecycle").inputs["rules"]
    assert expiry["filter"] == {"prefix": f"{c}/backups/"} and expiry["expiration"] == {"days": days + 1}, expiry
    assert expiry["noncurrentVersionExpiration"] == {"noncurrentDays": 1}, "no count: the lock decides, not uploads"
    assert expiry["abortIncompleteMultipartUpload"] == {"daysAfterInitiation": 1}, expiry


def test_only_the_etcd_role_may_write_backups_even_if_other_policies_allow_it(stack) -> None:
    cfg, program = stack
    c = cfg["clusterName"]
    etcd = "cp" if cfg.get("etcd", {}).get("placement") == "colocated" else "etcd"
    (write,) = [p for p in program.of_type(POLICY) if p.name.endswith("-policy-write-backups")]
    assert write.inputs["role"] == f"{c}-{etcd}-role-id", write.inputs["role"]
    statements = json.loads(program.named(f"{c}-etcd-backups-tls-only").inputs["policy"])["Statement"]
    (deny,) = [s for s in statements if s.get("Sid") == "OnlyEtcdMembersWriteBackups"]
    assert deny["Effect"] == "Deny" and deny["Principal"] == "*" and deny["Action"] == "s3:PutObject", deny
    assert deny["Resource"] == f"arn:aws:s3:::{c}-etcd-backups/{c}/backups/*", deny
    role_arn = program.outputs[f"{c}-{etcd}-role"]["arn"]
    assert deny["Condition"] == {"ArnNotEquals": {"aws:PrincipalArn": role_arn}}, deny
