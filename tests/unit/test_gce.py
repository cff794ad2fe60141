"""Policies of the GCE target, on what the program declares for every shipped GCE stack (issue 7).

Each stack is declared once per test session (the `declared` fixture caches it); every test
names the resource it found at fault.
"""

from __future__ import annotations

import math
import re
from typing import Any

import pytest

from components.render.etcd import CLIENT_PORT, METRICS_PORT, PEER_PORT
from components.render.kubernetes import API_PORT
from components.targets.gce_network import AUTOHEALING_AND_INTERNAL_LB_PROBES, EXTERNAL_PASSTHROUGH_LB_PROBES
from components.topology import quorum
from tests.conftest import ALL_STACKS
from tests.integration.realtls import SECRET_SIG
from tests.program import ROOT, Declared, Program, stack_config
from tests.unit.test_cloud_boot import refresh_problems

GCE_STACKS = [s for s in ALL_STACKS if stack_config(ROOT / "stacks" / f"Pulumi.{s}.yaml")["target"] == "gce"]
T = "gcp:compute/"
IGM, RIGM, PIC = f"{T}instanceGroupManager:InstanceGroupManager", \
    f"{T}regionInstanceGroupManager:RegionInstanceGroupManager", f"{T}perInstanceConfig:PerInstanceConfig"
CHECK, FIREWALL, TEMPLATE = f"{T}regionHealthCheck:RegionHealthCheck", f"{T}firewall:Firewall", \
    f"{T}instanceTemplate:InstanceTemplate"
BACKEND, RULE = f"{T}regionBackendService:RegionBackendService", f"{T}forwardingRule:ForwardingRule"
SECRET_IAM = "gcp:secretmanager/secretIamMember:SecretIamMember"
BUCKET, BUCKET_IAM = "gcp:storage/bucket:Bucket", "gcp:storage/bucketIAMMember:BucketIAMMember"
FOLDER, FOLDER_IAM = "gcp:storage/managedFolder:ManagedFolder", \
    "gcp:storage/managedFolderIamMember:ManagedFolderIamMember"


@pytest.fixture(params=GCE_STACKS)
def stack(request: pytest.FixtureRequest, declared) -> tuple[dict[str, Any], Program]:
    name = request.param
    return stack_config(ROOT / "stacks" / f"Pulumi.{name}.yaml"), declared(name)


def _check_of(program: Program, reference: str) -> Declared:
    """The health check an autohealing policy or backend service points at (mock ids are `<name>-id`)."""
    return program.named(reference.removesuffix("-id"))


def _ports(rule: Declared) -> set[int]:
    return {int(p) for allow in rule.inputs["allows"] for p in allow.get("ports", [])}


def test_gce_stacks_are_tested() -> None:
    assert set(GCE_STACKS) >= {"gce-example", "gce-five"}


def test_api_group_autoheals_on_https_readyz_6443(stack) -> None:
    program = stack[1]
    for group in program.of_type(RIGM):
        policy = group.inputs["autoHealingPolicies"]
        check = _check_of(program, policy["healthCheck"])
        https = check.inputs.get("httpsHealthCheck")
        assert https == {"port": API_PORT, "requestPath": "/readyz"}, f"{group.name}: autoheals on {check.name} {https}"
        assert policy["initialDelaySec"] >= 600, f"{group.name}: initial delay {policy['initialDelaySec']}s < boot time"
    assert len(program.of_type(RIGM)) == 1


def test_etcd_member_groups_autoheal_on_health_2381(stack) -> None:
    cfg, program = stack
    groups = program.of_type(IGM)
    assert len(groups) == cfg["etcd"]["members"], "one group per etcd member"
    for group in groups:
        policy = group.inputs["autoHealingPolicies"]
        check = _check_of(program, policy["healthCheck"])
        assert check.inputs.get("httpHealthCheck") == {"port": METRICS_PORT, "requestPath": "/health"}, \
            f"{group.name}: autoheals on {check.name}"
        assert policy["initialDelaySec"] >= 300, f"{group.name}: initial delay too short for a join"


def test_one_zone_lost_leaves_an_etcd_quorum_and_an_api_server(stack) -> None:
    program = stack[1]
    members = [g.inputs["zone"] for g in program.of_type(IGM)]
    for zone in set(members):
        left = sum(1 for z in members if z != zone)
        assert left >= quorum(len(members)), f"losing {zone} leaves {left} of {len(members)} etcd members"
    (api,) = program.of_type(RIGM)
    zones, size = api.inputs["distributionPolicyZones"], api.inputs["targetSize"]
    assert api.inputs["distributionPolicyTargetShape"] == "EVEN", f"{api.name}: not spread evenly"
    assert len(zones) >= 2 and size - math.ceil(size / len(zones)) >= 1, \
        f"{api.name}: {size} API servers over {zones} do not survive a zone"


def test_members_keep_their_address_and_persistent_members_their_disk(stack) -> None:
    cfg, program = stack
    persistent = cfg["etcd"]["disk"] == "persistent"
    for config in program.of_type(PIC):
        member, state = config.name.removesuffix("-instance-config"), config.inputs["preservedState"]
        (ip,) = state["internalIps"]
        assert ip["autoDelete"] == "NEVER" and ip["ipAddress"]["address"] == f"https://mock/{member}-address", \
            f"{config.name}: the member's reserved address is not preserved"
        assert state["metadata"] == {"kcp-slot": member}, f"{config.name}: slot metadata"
        disks = state.get("disks") or []
        if persistent:
            assert disks == [{"deviceName": "etcd-data", "source": f"{member}-data-id", "mode": "READ_WRITE",
                              "deleteRule": "NEVER"}], f"{config.name}: data disk not preserved: {disks}"
        else:
            assert not disks, f"{config.name}: local mode keeps no disk"
    for group in program.of_type(IGM):
        stateful = [d["deviceName"] for d in group.inputs.get("statefulDisks") or []]
        assert stateful == (["etcd-data"] if persistent else []), f"{group.name}: stateful disks {stateful}"
        assert "targetSize" not in group.inputs, f"{group.name}: the per-instance config sizes the group"


def test_local_mode_puts_etcd_on_local_ssd(stack) -> None:
    cfg, program = stack
    template = program.named(f"{cfg['clusterName']}-etcd-template")
    scratch = [d for d in template.inputs["disks"] if d.get("type") == "SCRATCH"]
    assert bool(scratch) == (cfg["etcd"]["disk"] == "local"), f"{template.name}: local SSD {scratch}"


def test_a_template_change_never_takes_two_etcd_members_down_at_once(stack) -> None:
    """A member group holds one VM and never acts on a new template by itself (OPPORTUNISTIC: only when its VM is
    replaced anyway), and could replace no more than that one; changes reach members by `cloud-refresh`, one at a
    time. The API servers may roll, never below their count (no unavailable instance, surge instead)."""
    program = stack[1]
    groups, configs = program.of_type(IGM), program.of_type(PIC)
    assert sorted(c.inputs["instanceGroupManager"] for c in configs) == sorted(g.inputs["name"] for g in groups), \
        "one per-instance config, so one VM, per member group"
    for group in groups:
        policy = group.inputs["updatePolicy"]
        assert policy["type"] == "OPPORTUNISTIC", f"{group.name} rolls on a template change"
        assert policy["maxUnavailableFixed"] <= 1 and policy["maxSurgeFixed"] == 0, f"{group.name}: {policy}"
        assert "targetSize" not in group.inputs, f"{group.name}: more than its one VM"
    for group in program.of_type(RIGM):
        policy = group.inputs["updatePolicy"]
        assert policy["maxUnavailableFixed"] == 0 and policy["maxSurgeFixed"] >= 1, f"{group.name}: {policy}"


def test_every_cloud_machine_runs_the_bundle_refresh_timer(stack) -> None:
    """Every group boots from a template whose startup script installs and starts the refresh timer."""
    program = stack[1]
    templates = {t.urn: t.inputs["metadata"]["startup-script"] for t in program.of_type(TEMPLATE)}
    for group in [*program.of_type(IGM), *program.of_type(RIGM)]:
        (template,) = group.property_dependencies["versions"]
        assert refresh_problems(templates[template]) == [], group.name


def _firewall(program: Program, kind: str) -> Declared:
    return next(r for r in program.of_type(FIREWALL) if r.name.endswith(f"-allow-{kind}"))


def test_api_port_open_only_to_admins_probes_and_cluster_hosts(stack) -> None:
    cfg, program = stack
    rule, c = _firewall(program, "api"), cfg["clusterName"]
    expected = set(cfg["network"]["adminCidrs"]) | set(EXTERNAL_PASSTHROUGH_LB_PROBES) | \
        set(AUTOHEALING_AND_INTERNAL_LB_PROBES) | {"10.0.0.10"}  # the mocked Cloud NAT addresses
    assert _ports(rule) == {API_PORT} and set(rule.inputs["sourceRanges"]) == expected, rule.name
    assert set(rule.inputs["sourceTags"]) == {f"{c}-apiserver", f"{c}-etcd"}, rule.name


def test_etcd_client_port_only_from_api_servers_and_members(stack) -> None:
    cfg, program = stack
    rule, c = _firewall(program, "etcd-client"), cfg["clusterName"]
    assert _ports(rule) == {CLIENT_PORT} and "sourceRanges" not in rule.inputs, rule.name
    assert set(rule.inputs["sourceTags"]) == {f"{c}-apiserver", f"{c}-etcd"}, rule.name
    assert rule.inputs["targetTags"] == [f"{c}-etcd"], rule.name


def test_etcd_peer_port_only_between_members(stack) -> None:
    cfg, program = stack
    rule, c = _firewall(program, "etcd-peer"), cfg["clusterName"]
    assert _ports(rule) == {PEER_PORT} and "sourceRanges" not in rule.inputs, rule.name
    assert rule.inputs["sourceTags"] == [f"{c}-etcd"] and rule.inputs["targetTags"] == [f"{c}-etcd"], rule.name


def test_etcd_health_port_only_from_probe_ranges(stack) -> None:
    rule = _firewall(stack[1], "etcd-health")
    assert _ports(rule) == {METRICS_PORT} and "sourceTags" not in rule.inputs, rule.name
    assert set(rule.inputs["sourceRanges"]) == set(AUTOHEALING_AND_INTERNAL_LB_PROBES), rule.name


def test_no_other_rule_opens_etcd_ports_and_none_opens_everything(stack) -> None:
    cfg, program = stack
    for rule in program.of_type(FIREWALL):
        assert rule.inputs["direction"] == "INGRESS" and "denies" not in rule.inputs, rule.name
        if _ports(rule) & {CLIENT_PORT, PEER_PORT}:
            assert rule.name.endswith(("-allow-etcd-client", "-allow-etcd-peer")), f"{rule.name} opens etcd"
        assert all(a.get("ports") for a in rule.inputs["allows"]), f"{rule.name} opens every port"
        if "0.0.0.0/0" in (rule.inputs.get("sourceRanges") or []):
            assert "0.0.0.0/0" in cfg["network"]["adminCidrs"], f"{rule.name} is open to the internet"


def test_etcd_load_balancer_is_internal_with_client_ip_affinity(stack) -> None:
    cfg, program = stack
    backend = next(b for b in program.of_type(BACKEND) if b.inputs["loadBalancingScheme"] == "INTERNAL")
    assert backend.inputs["sessionAffinity"] == "CLIENT_IP", f"{backend.name}: {backend.inputs['sessionAffinity']}"
    assert len(backend.inputs["backends"]) == cfg["etcd"]["members"], f"{backend.name}: not every member behind it"
    check = _check_of(program, backend.inputs["healthChecks"])
    assert check.inputs["httpHealthCheck"]["requestPath"] == "/health", backend.name
    rule = next(r for r in program.of_type(RULE) if r.inputs["loadBalancingScheme"] == "INTERNAL")
    assert rule.inputs["ports"] == [str(CLIENT_PORT)], rule.name


def test_api_load_balancer_is_passthrough_on_a_static_address_checked_like_autohealing(stack) -> None:
    cfg, program = stack
    backend = next(b for b in program.of_type(BACKEND) if b.inputs["loadBalancingScheme"] == "EXTERNAL")
    assert backend.inputs["protocol"] == "TCP", backend.name
    (group,) = program.of_type(RIGM)
    assert backend.inputs["healthChecks"] == group.inputs["autoHealingPolicies"]["healthCheck"], backend.name
    rule = next(r for r in program.of_type(RULE) if r.inputs["loadBalancingScheme"] == "EXTERNAL")
    assert rule.inputs["portRange"] == str(API_PORT), rule.name
    assert rule.inputs["ipAddress"] == program.outputs[f"{cfg['clusterName']}-api-lb"]["address"], rule.name


def test_vms_are_shielded_with_no_external_address(stack) -> None:
    for template in stack[1].of_type(TEMPLATE):
        assert all(v for v in template.inputs["shieldedInstanceConfig"].values()), template.name
        for nic in template.inputs["networkInterfaces"]:
            assert not nic.get("accessConfigs"), f"{template.name} has an external address"


def _strings(value: Any) -> list[str]:
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return [value] if isinstance(value, str) else []


def test_no_secret_in_any_metadata_value(stack) -> None:
    program = stack[1]
    encryption_key = program.outputs[f"{stack[0]['clusterName']}-secrets-encryption-key"]["base64"]
    holders = [(t.name, t.inputs["metadata"]) for t in program.of_type(TEMPLATE)]
    holders += [(p.name, p.inputs["preservedState"]["metadata"]) for p in program.of_type(PIC)]
    for name, metadata in holders:
        for value in _strings(metadata):
            assert SECRET_SIG not in value and "PRIVATE KEY" not in value, f"{name}: key material in metadata"
            assert encryption_key not in value, f"{name}: the encryption key is in metadata"
            assert not re.search(r"[A-Za-z0-9+/=]{400,}", value), f"{name}: a bundle-sized blob is in metadata"


def test_secret_access_is_only_accessor_bindings_of_the_control_plane_service_accounts(stack) -> None:
    """Which account reads which secret: tests/unit/test_cloud_identities.py. Here: every grant is a read of one
    secret by one of the cluster's role accounts; no binding replaces a secret's whole policy."""
    cfg, program = stack
    accounts = {f"serviceAccount:{cfg['clusterName']}-{role}-sa@mock.iam.gserviceaccount.com"
                for role in ("etcd", "api")}
    for grant in program.of_type(SECRET_IAM):
        assert grant.inputs["member"] in accounts and grant.inputs["role"] == "roles/secretmanager.secretAccessor", \
            f"{grant.name}: {grant.inputs['member']} {grant.inputs['role']}"
    for kind in ("secretmanager/secretIamBinding:SecretIamBinding", "secretmanager/secretIamPolicy:SecretIamPolicy"):
        assert not program.of_type(f"gcp:{kind}"), f"unexpected {kind}"
    for version in program.of_type("gcp:secretmanager/secretVersion:SecretVersion"):
        if "host-programs" not in version.name:
            assert SECRET_SIG in version.inputs["secretData"], f"{version.name}: bundle is not a Pulumi secret"


def _lock_days(cfg: dict[str, Any]) -> int:
    """docs/backups.md: the daily history, `recent` snapshots at the interval, at least a day."""
    backup = cfg.get("backup", {})
    retain = {"recent": 6, "daily": 7} | backup.get("retain", {})
    return max(retain["daily"], math.ceil(retain["recent"] * backup.get("intervalMinutes", 30) / 1440), 1)


def test_backup_bucket_retains_every_object_for_the_lock_period_and_is_private(stack) -> None:
    """A retention policy keeps every object (no one deletes or replaces it sooner, the lifecycle rule neither);
    versioning is off because GCS allows no retention policy beside it; deletion by age afterwards."""
    cfg, program = stack
    (bucket,) = program.of_type(BUCKET)
    i, days = bucket.inputs, _lock_days(cfg)
    assert days >= max(1, cfg.get("backup", {}).get("retain", {}).get("daily", 7))
    assert i["retentionPolicy"] == {"retentionPeriod": str(days * 86_400)}, f"{bucket.name}: retention policy"
    assert not i["versioning"]["enabled"], f"{bucket.name}: versioning and a retention policy are exclusive"
    assert i["publicAccessPrevention"] == "enforced" and i["uniformBucketLevelAccess"], f"{bucket.name}: public"
    assert "encryption" not in i, f"{bucket.name}: Google-managed encryption at rest expected"
    assert i["softDeletePolicy"]["retentionDurationSeconds"] >= 86_400, f"{bucket.name}: soft delete"
    (rule,) = i["lifecycleRules"]
    assert rule["action"]["type"] == "Delete" and rule["condition"] == {
        "matchesPrefixes": [f"{cfg['clusterName']}/backups/"], "age": days + 1, "withState": "ANY"}, rule


def test_only_etcd_hosts_may_add_backups_and_only_add(stack) -> None:
    """Create only: overwriting an object needs delete as well, so a host cannot replace or remove any backup."""
    cfg, program = stack
    c = cfg["clusterName"]
    role = program.named(f"{c}-backup-writer-role")
    assert role.inputs["permissions"] == ["storage.objects.create"], role.name
    grants = {g.name: g.inputs for g in program.of_type(BUCKET_IAM)}
    assert set(grants) == {f"{c}-backup-writer", f"{c}-marker-creator", f"{c}-marker-reader"}, grants
    objects = f"projects/_/buckets/{c}-etcd-backups/objects"
    assert grants[f"{c}-backup-writer"]["condition"]["expression"] == \
        f'resource.name.startsWith("{objects}/{c}/backups/")'
    for name in (f"{c}-marker-creator", f"{c}-marker-reader"):
        assert grants[name]["condition"]["expression"] == f'resource.name == "{objects}/{c}/cluster-formed"', name
    etcd = "cp" if cfg.get("etcd", {}).get("placement") == "colocated" else "etcd"
    for name, grant in grants.items():
        assert grant["member"].startswith(f"serviceAccount:{c}-{etcd}-sa@"), (name, grant["member"])


def test_etcd_hosts_may_list_the_delta_logs_chunks_and_nothing_else(stack) -> None:
    """storage.objects.list alone, on the delta log's managed folder alone: the listing carries each chunk's
    custom metadata (its last revision), so no object is read. Not a conditional bucket binding: Cloud Storage
    supports the list-prefix attribute only in Credential Access Boundaries (gce_access.backup_bucket_access)."""
    cfg, program = stack
    c = cfg["clusterName"]
    role = program.named(f"{c}-delta-lister-role")
    assert role.inputs["permissions"] == ["storage.objects.list"], role.name
    assert role.inputs["roleId"] == f"kcpDeltaLister_{c.replace('-', '_')}", role.name
    (folder,) = program.of_type(FOLDER)
    assert folder.inputs["name"] == f"{c}/backups/deltas/", folder.inputs
    assert folder.inputs["bucket"] == f"{c}-etcd-backups", folder.inputs
    (grant,) = program.of_type(FOLDER_IAM)
    etcd = "cp" if cfg.get("etcd", {}).get("placement") == "colocated" else "etcd"
    assert grant.inputs["managedFolder"] == folder.inputs["name"] and grant.inputs["role"] == f"{c}-delta-lister-role" \
        and grant.inputs["member"].startswith(f"serviceAccount:{c}-{etcd}-sa@") and "condition" not in grant.inputs, \
        grant.inputs
    for kind in ("managedFolderIamBinding:ManagedFolderIamBinding", "managedFolderIamPolicy:ManagedFolderIamPolicy",
                 "bucketIAMBinding:BucketIAMBinding", "bucketIAMPolicy:BucketIAMPolicy"):
        assert not program.of_type(f"gcp:storage/{kind}"), f"unexpected {kind}"


def test_service_account_has_only_logging_and_metrics_project_roles(stack) -> None:
    roles = {r.inputs["role"] for r in stack[1].of_type("gcp:projects/iAMMember:IAMMember")}
    assert roles == {"roles/logging.logWriter", "roles/monitoring.metricWriter"}, roles
