"""Entry point of `pulumi up`: validate the stack config, build the control plane, export.

All logic lives in components/; this file only wires config to the ControlPlane.
"""

import pulumi

from components.control_plane import ControlPlane
from components.stack_config import read_stack_config

config = read_stack_config()
control_plane = ControlPlane(config.cluster_name, config)

pulumi.export("apiEndpoint", control_plane.api_endpoint)
pulumi.export("etcdClientEndpoints", control_plane.etcd_client_endpoints)
pulumi.export("backupLocation", control_plane.backup_location)
pulumi.export("adminKubeconfig", control_plane.admin_kubeconfig)
pulumi.export("resilienceSummary", control_plane.summary)
pulumi.export("resilienceReport", control_plane.report)
