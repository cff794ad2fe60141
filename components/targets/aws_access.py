"""Who the AWS control-plane instances are, and what they may touch.

One instance role per role (components/targets/cloud.py: `etcd`, `api`, or `cp` when colocated),
with inline policies that name exact resources: every role GetSecretValue on the host programs and
its own slots' secrets, and the cluster key's Decrypt for those secrets only. Only the role of the
instances that run etcd may touch the backup bucket (`_backup_write_policy`: add backups; list and
read the delta log's chunks, nothing else) and attach volumes and interfaces: only the members'
own, to instances of this cluster. Describe calls have no
resource-level permissions in EC2, so they are the only `*` resources, and they only read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pulumi
import pulumi_aws as aws

from components.config import ClusterConfig
from components.naming import resource_name
from components.targets.cloud import (
    SHARED_IDENTITY,
    ExpiryRule,
    backup_prefix,
    delta_prefix,
    formerly,
    lock_days,
    marker_key,
    retention_rules,
)


@dataclass(frozen=True)
class Identity:
    name: str  # cloud.IDENTITIES
    inherited: bool  # the members' identity: the earlier shared one (cloud.SHARED_IDENTITY), its names and resources
    role: aws.iam.Role
    profile: aws.iam.InstanceProfile
    key: aws.kms.Key  # the cluster's one key (shared by every role): encrypts the secrets and the backup bucket


def _document(statements: list[dict[str, Any]]) -> pulumi.Output[str]:
    return pulumi.Output.json_dumps({"Version": "2012-10-17", "Statement": statements})


def _via(service: str, region: str) -> dict[str, Any]:
    """KMS use only through one service, so the key cannot decrypt anything handed to it directly."""
    return {"StringEquals": {"kms:ViaService": f"{service}.{region}.amazonaws.com"}}


def cluster_key(cfg: ClusterConfig, opts: pulumi.ResourceOptions) -> aws.kms.Key:
    cluster = cfg.cluster_name
    return aws.kms.Key(resource_name(cluster, "kms"), description=f"{cluster} control-plane secrets and backups",
                       enable_key_rotation=True, deletion_window_in_days=30, tags={"kcp-cluster": cluster}, opts=opts)


def instance_role(cfg: ClusterConfig, identity: str, inherited: bool, key: aws.kms.Key,
                  opts: pulumi.ResourceOptions) -> Identity:
    """The role and instance profile one role's instances run as (`identity`: cloud.IDENTITIES); the members' are
    the earlier ones, under the names they have (`inherited`)."""
    cluster = cfg.cluster_name
    name = resource_name(cluster, "kcp", identity)
    role = aws.iam.Role(
        resource_name(cluster, identity, "role"), name=name,
        assume_role_policy=json.dumps({"Version": "2012-10-17", "Statement": [{
            "Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}]}),
        tags={"kcp-cluster": cluster},
        opts=opts.merge(formerly(inherited, resource_name(cluster, SHARED_IDENTITY, "role"), "name")))
    profile = aws.iam.InstanceProfile(
        resource_name(cluster, identity, "profile"), name=name, role=role.name,
        opts=opts.merge(formerly(inherited, resource_name(cluster, SHARED_IDENTITY, "profile"), "name")))
    return Identity(identity, inherited, role, profile, key)


def policy(cluster: str, identity: Identity, kind: str, statements: list[dict[str, Any]],
           opts: pulumi.ResourceOptions) -> aws.iam.RolePolicy:
    """One inline policy; the inherited role's replace the shared role's of the same kind in place (no delete at
    the end of the upgrade removes them: it would, since an inline policy is known by role and name only)."""
    return aws.iam.RolePolicy(resource_name(cluster, identity.name, "policy", kind), name=resource_name(cluster, kind),
                              role=identity.role.id, policy=_document(statements),
                              opts=opts.merge(formerly(identity.inherited, resource_name(cluster, "policy", kind))))


def secrets_read_policy(cfg: ClusterConfig, identity: Identity, region: str, secret_arns: list[pulumi.Output[str]],
                        opts: pulumi.ResourceOptions) -> None:
    """Exactly these secrets, and the key only for them (Secrets Manager names the secret in the encryption context):
    a GetSecretValue on another slot's secret, granted by mistake later, would still not decrypt it."""
    decrypt = _via("secretsmanager", region)
    decrypt["StringEquals"]["kms:EncryptionContext:SecretARN"] = secret_arns
    policy(cfg.cluster_name, identity, "read-secrets", [
        {"Effect": "Allow", "Action": "secretsmanager:GetSecretValue", "Resource": secret_arns},
        {"Effect": "Allow", "Action": "kms:Decrypt", "Resource": identity.key.arn, "Condition": decrypt},
    ], opts)


def attach_policy(cfg: ClusterConfig, identity: Identity, instances_arn: pulumi.Input[str],
                  volume_arns: list[pulumi.Output[str]], interface_arns: list[pulumi.Output[str]],
                  opts: pulumi.ResourceOptions) -> None:
    """Attach exactly the members' volumes and interfaces, and only to this cluster's instances."""
    own = {"StringEquals": {"aws:ResourceTag/kcp-cluster": cfg.cluster_name}}
    statements: list[dict[str, Any]] = [
        {"Effect": "Allow", "Action": "ec2:AttachNetworkInterface", "Resource": interface_arns},
        {"Effect": "Allow", "Action": ["ec2:AttachNetworkInterface", *(["ec2:AttachVolume"] if volume_arns else [])],
         "Resource": instances_arn, "Condition": own},
        {"Effect": "Allow", "Action": ["ec2:DescribeVolumes", "ec2:DescribeNetworkInterfaces"], "Resource": "*"},
    ]
    if volume_arns:
        statements.insert(0, {"Effect": "Allow", "Action": "ec2:AttachVolume", "Resource": volume_arns})
    policy(cfg.cluster_name, identity, "attach-own-disk-and-address", statements, opts)


def _lifecycle_rule(rule: ExpiryRule) -> aws.s3.BucketLifecycleConfigurationRuleArgs:
    """A current version gets a delete marker `days` after its creation; a noncurrent one (expired, or an upload
    went over it) is deleted a day after it became noncurrent, but never while Object Lock retains it; the delete
    marker left alone is then removed by the same expiration. Abandoned multipart uploads go after a day."""
    return aws.s3.BucketLifecycleConfigurationRuleArgs(
        id=rule.prefix.rstrip("/").replace("/", "-"), status="Enabled",
        filter=aws.s3.BucketLifecycleConfigurationRuleFilterArgs(prefix=rule.prefix),
        expiration=aws.s3.BucketLifecycleConfigurationRuleExpirationArgs(days=rule.days),
        noncurrent_version_expiration=aws.s3.BucketLifecycleConfigurationRuleNoncurrentVersionExpirationArgs(
            noncurrent_days=1),
        abort_incomplete_multipart_upload=aws.s3.BucketLifecycleConfigurationRuleAbortIncompleteMultipartUploadArgs(
            days_after_initiation=1))


def backup_bucket(cfg: ClusterConfig, identity: Identity, region: str,
                  opts: pulumi.ResourceOptions) -> aws.s3.Bucket:
    """Versioned, public access blocked, SSE-KMS with the cluster key. Object Lock in governance mode retains every
    object version `lock_days` (no host, no lifecycle rule deletes it sooner: an upload over a key only adds a
    version); lifecycle rules delete by age after that. Only `identity` (the etcd members') may write below the
    backup prefix: its own policy grants it, the bucket policy refuses everyone else. Below the delta log's prefix
    the bucket policy also refuses, to everyone, any upload without `If-None-Match: *` (create only, never over an
    existing chunk); S3 documents the `s3:if-none-match` key for this:
    https://docs.aws.amazon.com/AmazonS3/latest/userguide/conditional-writes-enforce.html. Multipart uploads cannot
    carry the header, so none reach that prefix (a chunk is one PutObject)."""
    cluster = cfg.cluster_name
    bucket = aws.s3.Bucket(resource_name(cluster, "etcd-backups"), bucket_prefix=f"{cluster}-etcd-backups-",
                           tags={"kcp-cluster": cluster}, opts=opts)
    aws.s3.BucketPublicAccessBlock(resource_name(cluster, "etcd-backups-public-access"), bucket=bucket.id,
                                   block_public_acls=True, block_public_policy=True, ignore_public_acls=True,
                                   restrict_public_buckets=True, opts=opts)
    versioning = aws.s3.BucketVersioning(
        resource_name(cluster, "etcd-backups-versioning"), bucket=bucket.id,
        versioning_configuration=aws.s3.BucketVersioningVersioningConfigurationArgs(status="Enabled"), opts=opts)
    aws.s3.BucketServerSideEncryptionConfiguration(
        resource_name(cluster, "etcd-backups-encryption"), bucket=bucket.id, rules=[
            aws.s3.BucketServerSideEncryptionConfigurationRuleArgs(
                bucket_key_enabled=True,
                apply_server_side_encryption_by_default=aws.s3
                .BucketServerSideEncryptionConfigurationRuleApplyServerSideEncryptionByDefaultArgs(
                    sse_algorithm="aws:kms", kms_master_key_id=identity.key.arn))], opts=opts)
    # Enabled here, not by Bucket(object_lock_enabled=True): that would replace an existing bucket and its history;
    # S3 enables Object Lock on an existing versioned bucket (docs/backups.md). Uploads then need a checksum.
    aws.s3.BucketObjectLockConfiguration(
        resource_name(cluster, "etcd-backups-lock"), bucket=bucket.id, object_lock_enabled="Enabled",
        rule=aws.s3.BucketObjectLockConfigurationRuleArgs(
            default_retention=aws.s3.BucketObjectLockConfigurationRuleDefaultRetentionArgs(
                mode="GOVERNANCE", days=lock_days(cfg))),
        opts=opts.merge(pulumi.ResourceOptions(depends_on=[versioning])))
    # Lifecycle rules on noncurrent versions need versioning first.
    aws.s3.BucketLifecycleConfiguration(
        resource_name(cluster, "etcd-backups-lifecycle"), bucket=bucket.id,
        rules=[_lifecycle_rule(r) for r in retention_rules(cfg)],
        opts=opts.merge(pulumi.ResourceOptions(depends_on=[versioning])))
    prefix = backup_prefix(cluster)
    aws.s3.BucketPolicy(resource_name(cluster, "etcd-backups-tls-only"), bucket=bucket.id, policy=_document([{
        "Sid": "TlsOnly", "Effect": "Deny", "Principal": "*", "Action": "s3:*",
        "Resource": [bucket.arn, bucket.arn.apply(lambda a: f"{a}/*")],
        "Condition": {"Bool": {"aws:SecureTransport": "false"}}}, {
        "Sid": "OnlyEtcdMembersWriteBackups", "Effect": "Deny", "Principal": "*", "Action": "s3:PutObject",
        "Resource": bucket.arn.apply(lambda a: f"{a}/{prefix}/*"),
        "Condition": {"ArnNotEquals": {"aws:PrincipalArn": identity.role.arn}}}, {
        "Sid": "DeltaChunksCreateOnly", "Effect": "Deny", "Principal": "*", "Action": "s3:PutObject",
        "Resource": bucket.arn.apply(lambda a: f"{a}/{delta_prefix(cluster)}/*"),
        "Condition": {"Null": {"s3:if-none-match": "true"}}}]), opts=opts)
    _backup_write_policy(cfg, identity, region, bucket, opts)
    return bucket


def _backup_write_policy(cfg: ClusterConfig, identity: Identity, region: str, bucket: aws.s3.Bucket,
                         opts: pulumi.ResourceOptions) -> None:
    """PutObject below the backup prefix: no delete, no object retention or bypass (the bucket's default retention
    locks every version without them). No read or list of snapshots; of the delta log's chunks
    (`cloud.delta_prefix`) list and head/get only, which the members need to find the chunks already written and
    each one's `last` revision; create and read of the one cluster-formed marker."""
    prefix, marker = backup_prefix(cfg.cluster_name), marker_key(cfg.cluster_name)
    deltas = delta_prefix(cfg.cluster_name)
    policy(cfg.cluster_name, identity, "write-backups", [
        {"Effect": "Allow", "Action": "s3:PutObject",
         "Resource": [bucket.arn.apply(lambda a: f"{a}/{prefix}/*"), bucket.arn.apply(lambda a: f"{a}/{marker}")]},
        {"Effect": "Allow", "Action": "s3:GetObject", "Resource": bucket.arn.apply(lambda a: f"{a}/{marker}")},
        # Lets HeadObject answer 404 (not 403) for a missing marker, and lists nothing else.
        {"Effect": "Allow", "Action": "s3:ListBucket", "Resource": bucket.arn,
         "Condition": {"StringEquals": {"s3:prefix": marker}}},
        # The delta log: list one log's chunks, HeadObject each (HeadObject needs GetObject); nothing outside it.
        {"Effect": "Allow", "Action": "s3:ListBucket", "Resource": bucket.arn,
         "Condition": {"StringLike": {"s3:prefix": f"{deltas}/*"}}},
        {"Effect": "Allow", "Action": "s3:GetObject", "Resource": bucket.arn.apply(lambda a: f"{a}/{deltas}/*")},
        {"Effect": "Allow", "Action": ["kms:GenerateDataKey", "kms:Decrypt"], "Resource": identity.key.arn,
         "Condition": _via("s3", region)},
    ], opts)
