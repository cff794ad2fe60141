"""Who the GCE control-plane VMs are, and what they may touch: their service account, the backup bucket.

One dedicated service account runs every control-plane VM. It gets exactly: log and metric
writing, read access to this cluster's secrets (granted per secret, in gce.py), and in the
backup bucket object create/delete under the backup prefix (an overwrite in a versioned bucket
is a create plus a delete of the live version; docs/backups.md) plus create-only and read of
the one cluster-formed marker object. No list, no read of backups.
"""

from __future__ import annotations

from dataclasses import dataclass

import pulumi
import pulumi_gcp as gcp

from components.config import ClusterConfig, Gce
from components.naming import resource_name, short_name
from components.targets.cloud import VersionRule, backup_prefix, marker_key, retention_rules

PROJECT_ROLES = ("roles/logging.logWriter", "roles/monitoring.metricWriter")
SOFT_DELETE_SECONDS = 7 * 86_400  # a compromised host's deletes stay recoverable for a week


@dataclass(frozen=True)
class Identity:
    email: pulumi.Output[str]
    member: pulumi.Output[str]  # "serviceAccount:<email>", as IAM bindings name it


def control_plane_identity(cfg: ClusterConfig, gce: Gce, opts: pulumi.ResourceOptions) -> Identity:
    account = gcp.serviceaccount.Account(
        resource_name(cfg.cluster_name, "control-plane-sa"), project=gce.project,
        account_id=short_name(cfg.cluster_name, "kcp-vm"),
        display_name=f"{cfg.cluster_name} control-plane VMs", opts=opts)
    member = account.email.apply(lambda email: f"serviceAccount:{email}")
    for role in PROJECT_ROLES:
        gcp.projects.IAMMember(resource_name(cfg.cluster_name, "sa", role.split(".")[-1].lower()),
                               project=gce.project, role=role, member=member, opts=opts)
    return Identity(account.email, member)


def _lifecycle_rule(rule: VersionRule) -> gcp.storage.BucketLifecycleRuleArgs:
    """GCS counts `num_newer_versions` including the live version: N keeps exactly N versions."""
    if rule.keep_versions is not None:
        condition = gcp.storage.BucketLifecycleRuleConditionArgs(
            matches_prefixes=[rule.prefix], with_state="ARCHIVED", num_newer_versions=rule.keep_versions)
    else:
        condition = gcp.storage.BucketLifecycleRuleConditionArgs(matches_prefixes=[rule.prefix], age=rule.expire_days)
    return gcp.storage.BucketLifecycleRuleArgs(action=gcp.storage.BucketLifecycleRuleActionArgs(type="Delete"),
                                               condition=condition)


def backup_bucket_access(cfg: ClusterConfig, gce: Gce, member: pulumi.Output[str],
                         opts: pulumi.ResourceOptions) -> gcp.storage.Bucket:
    """Versioned, never public, uniformly IAM-controlled; encrypted at rest with Google-managed keys."""
    cluster = cfg.cluster_name
    bucket = gcp.storage.Bucket(
        resource_name(cluster, "etcd-backups"), project=gce.project, location=gce.region.upper(),
        uniform_bucket_level_access=True, public_access_prevention="enforced",
        versioning=gcp.storage.BucketVersioningArgs(enabled=True),
        soft_delete_policy=gcp.storage.BucketSoftDeletePolicyArgs(retention_duration_seconds=SOFT_DELETE_SECONDS),
        lifecycle_rules=[_lifecycle_rule(r) for r in retention_rules(cfg)],
        labels={"kcp-cluster": cluster}, opts=opts)
    writer = gcp.projects.IAMCustomRole(
        resource_name(cluster, "backup-writer-role"), project=gce.project,
        role_id=f"kcpBackupWriter_{cluster.replace('-', '_')}", title=f"{cluster} etcd backup writer",
        description="Add object versions under the backup prefix (create, and delete of the replaced live version).",
        permissions=["storage.objects.create", "storage.objects.delete"], opts=opts)
    prefix, marker = backup_prefix(cluster), marker_key(cluster)
    grants = [
        ("backup-writer", writer.name, "backup prefix only", 'resource.name.startsWith("{o}/' + prefix + '/")'),
        ("marker-creator", "roles/storage.objectCreator", "cluster-formed marker only",
         'resource.name == "{o}/' + marker + '"'),
        ("marker-reader", "roles/storage.objectViewer", "cluster-formed marker only",
         'resource.name == "{o}/' + marker + '"'),
    ]
    for kind, role, title, expression in grants:
        gcp.storage.BucketIAMMember(
            resource_name(cluster, kind), bucket=bucket.name, role=role, member=member,
            condition=gcp.storage.BucketIAMMemberConditionArgs(
                title=title, expression=bucket.name.apply(
                    lambda b, e=expression: e.format(o=f"projects/_/buckets/{b}/objects")))
            , opts=opts)
    return bucket
