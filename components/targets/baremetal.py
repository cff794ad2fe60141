"""Bare metal over SSH: the shared host files, shipped with pulumi-command.

Only what is specific to SSH hosts lives here: the connection, the order of steps on
existing machines, HAProxy + keepalived instead of a cloud load balancer, nftables
instead of cloud firewall rules, and the backup host instead of a bucket. Secrets
reach hosts on stdin (a bundle unpacked by tar), never on a command line.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import pulumi
import pulumi_command.remote as remote

from components import versions
from components.config import ClusterConfig
from components.facts import cluster_facts
from components.pki import Endpoints
from components.render import backup, monitoring, recovery
from components.render.agent import ENSURE_PYTHON, agent_files
from components.render.etcd import Member
from components.render.firewall import FirewallPeers
from components.render.hostfiles import (
    UNPACK_BUNDLE,
    HostFile,
    apiserver_files,
    bundle,
    etcd_member_files,
    firewall_files,
    loadbalancer_files,
    text_files,
)
from components.targets import Deployed, SharedAssets
from components.topology import Machine, Topology
from components.versions import kubelet_release_args
from kcp_host.contract import AGENT, BACKUP_SSH_KEY, BACKUP_SSH_KNOWN_HOSTS, DELTA_UNIT, HOST_IDENTITY

# trustOnFirstUse: the host's ed25519 key as it reports it, `TYPE BASE64` (a hostKey's shape).
READ_HOST_KEY = "cut -d' ' -f1,2 /etc/ssh/ssh_host_ed25519_key.pub"


class BareMetalTarget:
    """Declares, per host, the commands that turn a reachable Linux machine into its roles."""

    def __init__(self, name: str, cfg: ClusterConfig, topology: Topology, parent: pulumi.Resource) -> None:
        assert cfg.baremetal is not None
        self._name, self._cfg, self._bm, self._topology = name, cfg, cfg.baremetal, topology
        self._parent = parent
        addresses = {m.name: m.address or "" for m in (*topology.machines, *topology.spares)}
        key = self._bm.ssh_private_key
        self._ssh_key = pulumi.Output.secret(
            key.get_secret_value() if key is not None else Path(self._bm.ssh_private_key_path or "").read_text())
        self._cluster = cluster_facts(cfg, topology, addresses, self._bm.api_vip, self._backup_dest,
                                      BACKUP_SSH_KEY)
        bm = self._bm
        self._host_keys: dict[str, pulumi.Input[str]] = {
            h.address: h.host_key for h in (*bm.hosts, *bm.spares, bm.backup_host) if h.host_key}

    def endpoints(self) -> Endpoints:
        addresses = {m.name: m.address or "" for m in (*self._topology.machines, *self._topology.spares)}
        return Endpoints(api_host=self._bm.api_vip, etcd_lb_host=self._bm.api_vip,
                         member_addresses=addresses)

    # -- helpers ---------------------------------------------------------------------
    def _connection(self, name: str, address: str) -> remote.ConnectionArgsDict:
        """pulumi-command verifies a host only against `host_key` (then that key, of its type, only): without
        one, whoever answers on port 22 would receive the bundles."""
        if address not in self._host_keys:
            self._host_keys[address] = self._first_seen_key(name, address)
        return {**self._login(address), "host_key": self._host_keys[address]}

    def _login(self, address: str) -> remote.ConnectionArgsDict:
        return {"host": address, "user": self._bm.user, "private_key": self._ssh_key,
                "dial_error_limit": 20, "per_dial_timeout": 10}

    def _first_seen_key(self, name: str, address: str) -> pulumi.Output[str]:
        """trustOnFirstUse and no hostKey: the key the host reports at its first `pulumi up`, kept in the state as
        this read's output and never read again (changes of its connection are ignored).

        The read is the only connection that verifies nothing, and it ships nothing; every other one verifies the
        key it returned, so a host presenting another key later (an impostor, a replaced machine) is refused until
        its key is pinned. Nothing verifies the read itself: whoever answered it first is trusted.
        """
        read = remote.Command(
            f"{self._name}-{name}-host-key", connection=self._login(address), create=READ_HOST_KEY,
            add_previous_output_in_env=False,
            opts=pulumi.ResourceOptions(parent=self._parent, ignore_changes=["connection"]))
        return read.stdout

    def _command(self, host: Machine | str, step: str, create: str, *, address: str | None = None,
                 stdin: pulumi.Input[str] | None = None, update: str | None = None,
                 delete: pulumi.Input[str] | None = None, depends_on: list[pulumi.Resource] | None = None,
                 triggers: list[object] | None = None) -> remote.Command:
        """One idempotent step on one host; `update` runs instead of `create` when inputs change."""
        name = host.name if isinstance(host, Machine) else host
        addr = address or (host.address if isinstance(host, Machine) else None)
        assert addr
        if delete is not None:
            delete = pulumi.Output.from_input(delete).apply(lambda undo: self._owned(name, undo))
        return remote.Command(
            f"{self._name}-{name}-{step}", connection=self._connection(name, addr),
            create=create, update=update, delete=delete, stdin=stdin, triggers=triggers,
            add_previous_output_in_env=False,
            opts=pulumi.ResourceOptions(parent=self._parent, depends_on=depends_on or []),
        )

    def _identity(self, host: str) -> str:
        return f"{self._cfg.cluster_name}/{host}"

    def _owned(self, host: str, undo: str) -> str:
        """A delete undoes only what this host was deployed as: after a rename in place (same address, a
        new host or cluster name) the new resources are created first, and the old ones' deletes, which
        run last, must not remove what they just installed."""
        me = shlex.quote(self._identity(host))
        return (f'if [ "$(cat {HOST_IDENTITY} 2>/dev/null)" = {me} ]; then {undo}; '
                f"else echo 'this host is no longer deployed as '{me}': nothing to undo'; fi")

    def _files(self, host: Machine | str, step: str, files: pulumi.Output[list[HostFile]], then: str,
               update_then: str | None = None, depends_on: list[pulumi.Resource] | None = None,
               undo: str = "true", address: str | None = None, secret: bool = True) -> remote.Command:
        """Ship a bundle on stdin; a secret one never shows in logs or diffs.

        A new bundle updates the command in place (stdin changed): it unpacks again and runs
        `update_then`. On delete, `undo` runs (stop what the files configured), then the files
        are removed.
        """
        payload = files.apply(bundle)
        removal = files.apply(lambda fs: f"{undo}; rm -f " + " ".join(sorted(f.path for f in fs)))
        return self._command(host, step, f"{UNPACK_BUNDLE} && {then}",
                             stdin=pulumi.Output.secret(payload) if secret else payload,
                             update=f"{UNPACK_BUNDLE} && {update_then or then}", delete=removal,
                             depends_on=depends_on, address=address)

    def _install_agent(self, host: Machine | str, address: str) -> remote.Command:
        """The host agent, shipped like any host file: a new build updates it in place and restarts the agent's
        services that run (the delta archiver, the metrics server; never etcd)."""
        name = host.name if isinstance(host, Machine) else host
        identity = HostFile(HOST_IDENTITY, self._identity(name) + "\n")
        return self._files(host, "agent", pulumi.Output.from_input([*agent_files(), identity]),
                           f"{ENSURE_PYTHON} && {AGENT} restart-agent-services", address=address, secret=False)

    def _firewall_peers(self) -> FirewallPeers:
        t = self._topology
        addrs = lambda machines: tuple(m.address or "" for m in machines)  # noqa: E731
        return FirewallPeers(
            operators=tuple(self._bm.operator_cidrs), admins=tuple(self._cfg.network.admin_cidrs),
            api_servers=addrs(t.api_servers), load_balancers=addrs(t.load_balancers),
            etcd_members=addrs((*t.etcd_members, *t.spares)),
            backup_hosts=(self._bm.backup_host.address,), cluster_hosts=addrs((*t.machines, *t.spares)),
            monitoring=tuple(self._bm.monitoring_cidrs),
        )

    @property
    def _backup_dest(self) -> str:
        bh = self._bm.backup_host
        return backup.ssh_destination(bh.user, bh.address, bh.path, self._cfg.cluster_name)

    # -- deploy ----------------------------------------------------------------------
    def deploy(self, assets: SharedAssets) -> Deployed:
        t = self._topology
        agents = {m.name: self._install_agent(m, m.address or "") for m in (*t.machines, *t.spares)}
        firewalls: dict[str, remote.Command] = {}
        for machine in (*t.machines, *t.spares):
            # Host after host, each after its member (if any) made the membership follow the stack: a
            # leaver is removed while the remaining members still reach it, and a firewall that would
            # lock the program out stops at the first host. Before etcd: connections opened before
            # nftables tracks them stall once it loads (Debian trixie: ~55 s without a leader).
            after = [agents[machine.name], *list(firewalls.values())[-1:]]
            if machine in t.etcd_members:
                after.append(self._membership(machine, after))
            firewalls[machine.name] = self._firewall(machine, after)
        receiver = self._backup_host(assets, self._install_agent("backup", self._bm.backup_host.address))
        started = self._etcd(assets, firewalls, receiver)
        apiservers: list[remote.Command] = []
        balancers: list[remote.Command] = []
        for machine in t.machines:
            after = [firewalls[machine.name], *started]
            if machine.has("apiserver"):
                # One at a time on update: each host's API server is ready again before the next one restarts.
                apiservers.append(self._apiserver(machine, assets, [*after, *apiservers[-1:]]))
            if machine.has("loadbalancer"):
                # One at a time, so the API VIP always has a holder whose HAProxy runs.
                balancers.append(self._loadbalancer(machine, [*after, *balancers[-1:]]))
        members = [f"https://{m.address}:2379" for m in t.etcd_members]
        return Deployed(
            api_endpoint=pulumi.Output.from_input(f"https://{self._bm.api_vip}:6443"),
            etcd_client_endpoints=pulumi.Output.from_input(members),
            backup_location=pulumi.Output.from_input(self._backup_dest),
        )

    def _membership(self, host: Machine, after: list[pulumi.Resource]) -> remote.Command:
        """Makes etcd's membership follow the stack from this member, before its firewall changes."""
        pairs = lambda machines: ",".join(f"{m.name}=https://{m.address}:2380" for m in machines)  # noqa: E731
        t = self._topology
        return self._command(host, "membership", f"{AGENT} etcd-reconcile-members --members="
                             f"{shlex.quote(pairs(t.etcd_members))} --spares={shlex.quote(pairs(t.spares))}",
                             depends_on=list(after))

    def _firewall(self, host: Machine, after: list[pulumi.Resource]) -> remote.Command:
        operators = shlex.quote(",".join(self._bm.operator_cidrs))
        return self._files(host, "firewall", pulumi.Output.from_input(firewall_files(self._firewall_peers())),
                           f"{AGENT} firewall-apply --operators={operators}", depends_on=after,
                           undo="systemctl disable --now kcp-firewall; nft delete table inet kcp 2>/dev/null || true")

    def _install_etcd(self, host: Machine, after: remote.Command) -> remote.Command:
        version, source = self._cfg.etcd.version, self._cfg.etcd.source
        checksum = "-" if source == "distro" else versions.ETCD_SHA256["amd64"][version]
        return self._command(host, "install-etcd", f"{AGENT} etcd-install {source} {version} {checksum}",
                             depends_on=[after])

    def _etcd(self, assets: SharedAssets, firewalls: dict[str, remote.Command],
              receiver: remote.Command) -> list[remote.Command]:
        """Configure every member before any starts (initial-cluster-state=new), then wait for health."""
        t = self._topology
        spare_files = recovery.spare_watch_files(self._bm.spare_takeover_after_seconds, 30)
        bh = self._bm.backup_host
        # The backup job accepts only the pinned key; unpinned (trustOnFirstUse), its first contact learns one.
        pinned_backup = [HostFile(BACKUP_SSH_KNOWN_HOSTS, backup.known_hosts(bh.address, bh.host_key))] \
            if bh.host_key else []
        configured: list[remote.Command] = []
        for host in (*t.etcd_members, *t.spares):
            installed = self._install_etcd(host, firewalls[host.name])
            files = pulumi.Output.all(assets.credentials, assets.backup_private_key_openssh).apply(
                lambda v, host=host: [
                    *etcd_member_files(self._cluster, Member(host.name, host.address or ""), v[0]),
                    HostFile(BACKUP_SSH_KEY, v[1], 0o600),
                    *pinned_backup,
                    *(text_files(spare_files) if host in t.spares else []),
                ])
            # Serial on update: each member restarts and is healthy before the next one.
            configured.append(self._files(
                host, "etcd-config", files, "systemctl daemon-reload",
                # The version is in the command so that a new etcd release alone also rolls the members.
                update_then=f"systemctl daemon-reload && {AGENT} etcd-rolling-restart  # etcd {self._cfg.etcd.version}",
                depends_on=[installed, receiver, *configured[-1:]], undo="systemctl disable --now etcd"))
        starts = [self._command(m, "etcd-start", "systemctl enable etcd && systemctl start --no-block etcd",
                                delete=f"{AGENT} etcd-member-leave", depends_on=configured)
                  for m in t.etcd_members]
        first = t.etcd_members[0]
        # Names the members, so that a change of members runs it again: `pulumi up` ends once they vote.
        voters = ",".join(m.name for m in t.etcd_members)
        healthy = self._command(first, "etcd-healthy", f"{AGENT} etcd-wait-healthy 300 --voters={shlex.quote(voters)}",
                                depends_on=starts)
        formed = [self._command(h, "etcd-formed", "touch /etc/etcd/cluster-formed",
                                delete="rm -f /etc/etcd/cluster-formed", depends_on=[healthy])
                  for h in (*t.etcd_members, *t.spares)]
        for spare in t.spares:
            self._command(spare, "spare-watch",
                          "systemctl daemon-reload && systemctl enable --now etcd-spare-watch.timer",
                          delete="systemctl disable --now etcd-spare-watch.timer", depends_on=formed)
        for host in (*t.etcd_members, *t.spares):  # the metrics, on members and spares (docs/alerts.md)
            self._command(host, "metrics", monitoring.enable_command(),
                          delete=f"systemctl disable --now {' '.join(monitoring.UNITS)}", depends_on=formed)
        for member in t.etcd_members:
            self._command(member, "backup-timer", "systemctl enable --now etcd-backup.timer",
                          delete="systemctl disable --now etcd-backup.timer", depends_on=formed)
            if self._cluster.backup.delta_seconds:
                self._command(member, "delta-archive",
                              backup.delta_enable_command(self._cfg.cluster_name, self._cluster.backup.delta_seconds),
                              delete=f"systemctl disable --now {DELTA_UNIT}",
                              depends_on=formed)
            self._command(member, "maintain-timer",
                          "systemctl daemon-reload && systemctl enable --now etcd-maintain.timer",
                          delete="systemctl disable --now etcd-maintain.timer", depends_on=formed)
        return [healthy, *formed]

    def _backup_host(self, assets: SharedAssets, agent: remote.Command) -> remote.Command:
        bh, cfg = self._bm.backup_host, self._cfg
        line = assets.backup_public_key_openssh.apply(
            lambda key: backup.backup_receiver_authorized_key(
                key, bh.path, cfg.cluster_name, cfg.backup.retain.recent, cfg.backup.retain.daily))
        return self._command(
            "backup", "receiver",
            f"{AGENT} backup-host-setup {shlex.quote(bh.user)} "
            f"{shlex.quote(backup.receiver_root(bh.path, cfg.cluster_name))}",
            address=bh.address, stdin=line, depends_on=[agent])

    def _apiserver(self, host: Machine, assets: SharedAssets, after: list[pulumi.Resource]) -> remote.Command:
        """The API server's files; on update, its kubelet's static pods restart from them (not every host's kubelet
        at once) and its API server is ready before the step ends."""
        files = assets.credentials.apply(lambda creds: apiserver_files(self._cluster, creds))
        placed = self._files(host, "apiserver-config", files, "true", depends_on=after,
                             update_then=f"{AGENT} static-pods-restart --address {shlex.quote(host.address or '')}")
        if self._bm.install_kubelet:
            release = kubelet_release_args(self._cfg.kubernetes_version)
            self._command(host, "install-kubelet", f"{AGENT} kubelet-install {release}", depends_on=[placed])
        return placed

    def _loadbalancer(self, host: Machine, after: list[pulumi.Resource]) -> remote.Command:
        t = self._topology
        member = lambda m: Member(m.name, m.address or "")  # noqa: E731
        files = pulumi.Output.from_input(loadbalancer_files(
            self._cluster, member(host), self._bm.api_vip, self._bm.vip_interface,
            [member(m) for m in t.api_servers], [member(m) for m in t.load_balancers]))
        return self._files(host, "loadbalancer", files,
                           "systemctl enable haproxy keepalived "
                           "&& systemctl reload-or-restart haproxy keepalived", depends_on=after,
                           undo="systemctl disable --now haproxy keepalived")

