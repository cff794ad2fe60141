"""One naming helper per resource kind, valid on every cloud.

GCE names are RFC 1035 labels of at most 63 characters; AWS load balancer and target
group names allow at most 32. Cluster names are limited (see validation) so that the
longest derived name still fits; the assertions catch a helper that would break that.
"""

import re

CLUSTER_NAME_MAX = 20
_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def _join(*parts: str, limit: int) -> str:
    name = "-".join(parts)
    if len(name) > limit or not _LABEL.match(name):
        raise ValueError(f"derived name {name!r} is not a valid name of at most {limit} characters")
    return name


def machine_name(cluster: str, role: str, index: int) -> str:
    """`prod-etcd-0`: stable per slot, so a replacement keeps its member name."""
    return _join(cluster, role, str(index), limit=63)


def resource_name(cluster: str, *kind: str) -> str:
    """A cloud resource name (`prod-api-hc`), valid for GCE and as a Pulumi name."""
    return _join(cluster, *kind, limit=63)


def short_name(cluster: str, *kind: str) -> str:
    """Names with AWS's 32-character limit (load balancers, target groups)."""
    return _join(cluster, *kind, limit=32)
