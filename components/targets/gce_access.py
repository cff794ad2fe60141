"""Who the GCE control-plane VMs are, and what they may touch: their service accounts, the backup bucket.

One dedicated service account per role (components/targets/cloud.py: `etcd`, `api`, or `cp` when
colocated) runs that role's VMs. Each gets log and metric writing and read access to the host
programs and its own slots' secrets (granted per secret, in gce.py). Only the account of the
machines that run etcd gets any access to the backup bucket: what `backup_bucket_access` grants
(add backups; list the delta log's chunks only).
"""

from __future__ import annotations

from dataclasses import dataclass

import pulumi
import pulumi_gcp as gcp

from components.config import ClusterConfig, Gce
from components.naming import resource_name, short_name
from components.targets import cloud
from components.targets.cloud import ExpiryRule, backup_prefix, delta_prefix, lock_days, marker_key, retention_rules

PROJECT_ROLES = ("roles/logging.logWriter", "roles/monitoring.metricWriter")
SOFT_DELETE_SECONDS = 7 * 86_400  # a compromised host's deletes stay recoverable for a week


@dataclass(frozen=True)
class Identity:
    email: pulumi.Output[str]
    member: pulumi.Output[str]  # "serviceAccount:<email>", as IAM bindings name it


def service_account(cfg: ClusterConfig, gce: Gce, identity: str, inherited: bool,
                    opts: pulumi.ResourceOptions) -> Identity:
    """The account one role's VMs run as (`identity`: cloud.IDENTITIES); every role writes logs and metrics. The
    members' account is the earlier one, under the account ID it has (`inherited`: cloud.SHARED_IDENTITY)."""
    cluster = cfg.cluster_name
    account = gcp.serviceaccount.Account(
        resource_name(cluster, identity, "sa"), project=gce.project,
        account_id=short_name(cluster, "kcp", identity), display_name=f"{cluster} control-plane VMs: {identity}",
        opts=opts.merge(cloud.formerly(inherited, resource_name(cluster, cloud.SHARED_IDENTITY, "sa"), "accountId")))
    member = account.email.apply(lambda email: f"serviceAccount:{email}")
    for role in PROJECT_ROLES:
        grant = role.split(".")[-1].lower()
        earlier = cloud.formerly(inherited, resource_name(cluster, "sa", grant))
        gcp.projects.IAMMember(resource_name(cluster, identity, "sa", grant), project=gce.project, role=role,
                               member=member, opts=opts.merge(earlier))
    return Identity(account.email, member)


def _lifecycle_rule(rule: ExpiryRule) -> gcp.storage.BucketLifecycleRuleArgs:
    """By age, live or not (objects of the earlier versioned layout expire too); never before the retention ends."""
    return gcp.storage.BucketLifecycleRuleArgs(
        action=gcp.storage.BucketLifecycleRuleActionArgs(type="Delete"),
        condition=gcp.storage.BucketLifecycleRuleConditionArgs(matches_prefixes=[rule.prefix], age=rule.days,
                                                               with_state="ANY"))


def backup_bucket_access(cfg: ClusterConfig, gce: Gce, member: pulumi.Output[str],
                         opts: pulumi.ResourceOptions) -> gcp.storage.Bucket:
    """Never public, uniformly IAM-controlled, encrypted at rest with Google-managed keys. A retention policy of
    `lock_days` (not locked: an owner can still lift it) keeps every object from deletion and replacement; it and
    Object Versioning are mutually exclusive, so versioning is off: each snapshot is a new object anyway.
    `member` (the etcd members' identity) is the only one granted anything: create only below the backup prefix (no
    overwrite: that needs delete; no delete, no read), create and read of the cluster-formed marker, and list only
    of the delta log's chunks (a managed folder at `delta_prefix`; the listing carries each chunk's custom
    metadata, so no read of any object is needed), never of snapshots.

    The list grant is on a managed folder, not a conditional bucket binding: a list call's resource.name is the
    bucket, and the list-prefix attribute (`storage.googleapis.com/objectListPrefix`) works only in Credential
    Access Boundaries; in a role binding "Cloud Storage methods will work incorrectly and fail unexpectedly"
    (https://cloud.google.com/iam/docs/conditions-attribute-reference#api-attributes-storage). A role on a managed
    folder applies to the objects named below it, listing included
    (https://cloud.google.com/storage/docs/managed-folders, https://cloud.google.com/storage/docs/listing-objects)."""
    cluster = cfg.cluster_name
    bucket = gcp.storage.Bucket(
        resource_name(cluster, "etcd-backups"), project=gce.project, location=gce.region.upper(),
        uniform_bucket_level_access=True, public_access_prevention="enforced",
        versioning=gcp.storage.BucketVersioningArgs(enabled=False),
        retention_policy=gcp.storage.BucketRetentionPolicyArgs(retention_period=str(lock_days(cfg) * 86_400)),
        soft_delete_policy=gcp.storage.BucketSoftDeletePolicyArgs(retention_duration_seconds=SOFT_DELETE_SECONDS),
        lifecycle_rules=[_lifecycle_rule(r) for r in retention_rules(cfg)],
        labels={"kcp-cluster": cluster}, opts=opts)
    writer = gcp.projects.IAMCustomRole(
        resource_name(cluster, "backup-writer-role"), project=gce.project,
        role_id=f"kcpBackupWriter_{cluster.replace('-', '_')}", title=f"{cluster} etcd backup writer",
        description="Add new objects under the backup prefix; no overwrite (that needs delete), no delete, no read.",
        permissions=["storage.objects.create"], opts=opts)
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
    lister = gcp.projects.IAMCustomRole(
        resource_name(cluster, "delta-lister-role"), project=gce.project,
        role_id=f"kcpDeltaLister_{cluster.replace('-', '_')}", title=f"{cluster} etcd delta log lister",
        description="List the delta log's chunks (granted on its managed folder only); no read, no write.",
        permissions=["storage.objects.list"], opts=opts)
    # force_destroy: deleting the folder leaves its chunks in place (the retention policy keeps them anyway).
    folder = gcp.storage.ManagedFolder(resource_name(cluster, "delta-folder"), bucket=bucket.name,
                                       name=f"{delta_prefix(cluster)}/", force_destroy=True, opts=opts)
    gcp.storage.ManagedFolderIamMember(resource_name(cluster, "delta-lister"), bucket=bucket.name,
                                       managed_folder=folder.name, role=lister.name, member=member, opts=opts)
    return bucket
