"""Who the AWS control-plane instances are, and what they may touch.

One instance role for every control-plane instance, with inline policies that name exact
resources: GetSecretValue on this cluster's secrets; PutObject under the backup prefix (an
overwrite in a versioned bucket only adds a version; docs/backups.md) and create/read of the
one cluster-formed marker; attaching only the members' own volumes and interfaces, to
instances of this cluster. Describe calls have no resource-level permissions in EC2, so they
are the only `*` resources, and they only read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pulumi
import pulumi_aws as aws

from components.config import ClusterConfig
from components.naming import resource_name
from components.targets.cloud import VersionRule, backup_prefix, marker_key, retention_rules


@dataclass(frozen=True)
class Identity:
    role: aws.iam.Role
    profile: aws.iam.InstanceProfile
    key: aws.kms.Key  # encrypts the secrets and the backup bucket


def _document(statements: list[dict[str, Any]]) -> pulumi.Output[str]:
    return pulumi.Output.json_dumps({"Version": "2012-10-17", "Statement": statements})


def _via(service: str, region: str) -> dict[str, Any]:
    """KMS use only through one service, so the key cannot decrypt anything handed to it directly."""
    return {"StringEquals": {"kms:ViaService": f"{service}.{region}.amazonaws.com"}}


def control_plane_identity(cfg: ClusterConfig, region: str, opts: pulumi.ResourceOptions) -> Identity:
    cluster = cfg.cluster_name
    key = aws.kms.Key(resource_name(cluster, "kms"), description=f"{cluster} control-plane secrets and backups",
                      enable_key_rotation=True, deletion_window_in_days=30, tags={"kcp-cluster": cluster}, opts=opts)
    role = aws.iam.Role(
        resource_name(cluster, "control-plane-role"), name=resource_name(cluster, "control-plane"),
        assume_role_policy=json.dumps({"Version": "2012-10-17", "Statement": [{
            "Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}]}),
        tags={"kcp-cluster": cluster}, opts=opts)
    profile = aws.iam.InstanceProfile(resource_name(cluster, "control-plane-profile"),
                                      name=resource_name(cluster, "control-plane"), role=role.name, opts=opts)
    return Identity(role, profile, key)


def policy(cluster: str, identity: Identity, kind: str, statements: list[dict[str, Any]],
           opts: pulumi.ResourceOptions) -> aws.iam.RolePolicy:
    return aws.iam.RolePolicy(resource_name(cluster, "policy", kind), name=resource_name(cluster, kind),
                              role=identity.role.id, policy=_document(statements), opts=opts)


def secrets_read_policy(cfg: ClusterConfig, identity: Identity, region: str, secret_arns: list[pulumi.Output[str]],
                        opts: pulumi.ResourceOptions) -> None:
    policy(cfg.cluster_name, identity, "read-secrets", [
        {"Effect": "Allow", "Action": "secretsmanager:GetSecretValue", "Resource": secret_arns},
        {"Effect": "Allow", "Action": "kms:Decrypt", "Resource": identity.key.arn,
         "Condition": _via("secretsmanager", region)},
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


def _lifecycle_rule(rule: VersionRule) -> aws.s3.BucketLifecycleConfigurationRuleArgs:
    """S3 counts noncurrent versions only: keeping N versions is N-1 noncurrent beside the live one."""
    expire = noncurrent = None
    if rule.keep_versions is not None:
        noncurrent = aws.s3.BucketLifecycleConfigurationRuleNoncurrentVersionExpirationArgs(
            noncurrent_days=1, newer_noncurrent_versions=rule.keep_versions - 1 or None)
    else:
        expire = aws.s3.BucketLifecycleConfigurationRuleExpirationArgs(days=rule.expire_days)
    return aws.s3.BucketLifecycleConfigurationRuleArgs(
        id=rule.prefix.rstrip("/").replace("/", "-"), status="Enabled",
        filter=aws.s3.BucketLifecycleConfigurationRuleFilterArgs(prefix=rule.prefix),
        expiration=expire, noncurrent_version_expiration=noncurrent)


def backup_bucket(cfg: ClusterConfig, identity: Identity, region: str,
                  opts: pulumi.ResourceOptions) -> aws.s3.Bucket:
    """Versioned, public access blocked, SSE-KMS with the cluster key, exact-count lifecycle rules."""
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
    # Lifecycle rules on noncurrent versions need versioning first.
    aws.s3.BucketLifecycleConfiguration(
        resource_name(cluster, "etcd-backups-lifecycle"), bucket=bucket.id,
        rules=[_lifecycle_rule(r) for r in retention_rules(cfg)],
        opts=opts.merge(pulumi.ResourceOptions(depends_on=[versioning])))
    aws.s3.BucketPolicy(resource_name(cluster, "etcd-backups-tls-only"), bucket=bucket.id, policy=_document([{
        "Sid": "TlsOnly", "Effect": "Deny", "Principal": "*", "Action": "s3:*",
        "Resource": [bucket.arn, bucket.arn.apply(lambda a: f"{a}/*")],
        "Condition": {"Bool": {"aws:SecureTransport": "false"}}}]), opts=opts)
    _backup_write_policy(cfg, identity, region, bucket, opts)
    return bucket


def _backup_write_policy(cfg: ClusterConfig, identity: Identity, region: str, bucket: aws.s3.Bucket,
                         opts: pulumi.ResourceOptions) -> None:
    prefix, marker = backup_prefix(cfg.cluster_name), marker_key(cfg.cluster_name)
    policy(cfg.cluster_name, identity, "write-backups", [
        {"Effect": "Allow", "Action": "s3:PutObject",
         "Resource": [bucket.arn.apply(lambda a: f"{a}/{prefix}/*"), bucket.arn.apply(lambda a: f"{a}/{marker}")]},
        {"Effect": "Allow", "Action": "s3:GetObject", "Resource": bucket.arn.apply(lambda a: f"{a}/{marker}")},
        # Lets HeadObject answer 404 (not 403) for a missing marker, and lists nothing else.
        {"Effect": "Allow", "Action": "s3:ListBucket", "Resource": bucket.arn,
         "Condition": {"StringEquals": {"s3:prefix": marker}}},
        {"Effect": "Allow", "Action": ["kms:GenerateDataKey", "kms:Decrypt"], "Resource": identity.key.arn,
         "Condition": _via("s3", region)},
    ], opts)
