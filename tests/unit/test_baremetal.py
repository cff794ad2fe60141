"""Policies of the bare-metal target, on what the program declares for the `local` stack."""

from __future__ import annotations

import base64
import gzip
import io
import itertools
import re
import tarfile

from tests.integration.realtls import SECRET_SIG, plain
from tests.program import Program

COMMAND = "command:remote:Command"


def _commands(program: Program) -> list:
    return program.of_type(COMMAND)


def test_every_command_receives_its_payload_on_stdin_as_a_secret(declared) -> None:
    for command in _commands(declared("local")):
        stdin = command.inputs.get("stdin")
        if stdin is not None and command.name.endswith(("-config", "-loadbalancer", "-firewall")):
            assert isinstance(stdin, dict) and SECRET_SIG in stdin, f"{command.name}: stdin is not a secret"


def test_no_command_line_carries_key_material(declared) -> None:
    for command in _commands(declared("local")):
        for field in ("create", "update", "delete"):
            line = command.inputs.get(field)
            if isinstance(line, str):
                assert "PRIVATE KEY" not in line and not re.search(r"[A-Za-z0-9+/]{200,}", line), \
                    f"{command.name}.{field} carries key material"


def test_ssh_connection_key_is_a_secret(declared) -> None:
    for command in _commands(declared("local")):
        assert SECRET_SIG in command.inputs["connection"], f"{command.name}: connection (with key) not secret"


def test_every_member_is_configured_before_any_member_starts(declared) -> None:
    names = [r.name for r in declared("local").resources]
    last_config = max(names.index(f"local-{h}-etcd-config") for h in ("h1", "h2", "h3", "spare1"))
    first_start = min(names.index(f"local-{h}-etcd-start") for h in ("h1", "h2", "h3"))
    assert last_config < first_start


def test_things_that_need_etcd_wait_for_a_healthy_cluster(declared) -> None:
    names = [r.name for r in declared("local").resources]
    healthy = names.index("local-h1-etcd-healthy")
    for dependent in ("local-h1-apiserver-config", "local-h2-loadbalancer", "local-h1-backup-timer",
                      "local-spare1-spare-watch"):
        assert names.index(dependent) > healthy, f"{dependent} may run before etcd is healthy"


def test_the_health_wait_names_the_members_so_a_change_of_members_runs_it_again(declared) -> None:
    command = declared("local").named("local-h1-etcd-healthy").inputs["create"]
    assert command.endswith("kcp-host etcd-wait-healthy 300 --voters=h1,h2,h3"), command


def test_etcd_is_installed_from_the_pinned_source(declared) -> None:
    install = declared("local").named("local-h1-install-etcd").inputs["create"]
    assert install.endswith("etcd-install distro 3.5.16 -")


def test_config_changes_restart_members_one_at_a_time(declared) -> None:
    program = declared("local")
    for host in ("h1", "h2", "h3"):
        update = program.named(f"local-{host}-etcd-config").inputs["update"]
        assert update.endswith("kcp-host etcd-rolling-restart  # etcd 3.5.16"), \
            f"local-{host}-etcd-config restarts without the guard, or a new etcd release would not roll it"


def test_api_servers_restart_their_static_pods_one_at_a_time(declared) -> None:
    """A kubelet restarts a static pod as soon as its manifest changes: every host's step waits for the one before
    it, and restarts its pods itself, waiting until its API server is ready."""
    program = declared("local")
    hosts = ["h1", "h2", "h3"]
    for index, host in enumerate(hosts, start=1):
        update = program.named(f"local-{host}-apiserver-config").inputs["update"]
        assert update.endswith(f"kcp-host static-pods-restart --address 10.250.0.1{index}"), update
    for before, host in itertools.pairwise(hosts):
        assert f"local-{before}-apiserver-config" in _waits_for(program, f"local-{host}-apiserver-config")


def test_removing_a_member_goes_through_the_quorum_guard(declared) -> None:
    for host in ("h1", "h2", "h3"):
        assert "kcp-host etcd-member-leave;" in declared("local").named(f"local-{host}-etcd-start").inputs["delete"]


def test_every_delete_undoes_only_what_its_host_was_deployed_as(declared) -> None:
    """A host renamed in place gets its new resources first; the old ones' deletes run last and must not
    remove what the new ones installed."""
    program = declared("local")
    for command in _commands(program):
        host = command.name.removeprefix("local-").rsplit("-", 1)[0].split("-")[0]
        delete = plain(command.inputs.get("delete"))
        if delete:
            assert delete.startswith(f'if [ "$(cat /etc/kcp/host-identity 2>/dev/null)" = local/{host} ]; then'), \
                f"{command.name}: delete is not guarded by its host identity: {delete[:80]}"
        if command.name.endswith("-agent"):
            assert f"local/{host}\n" in _bundle_files(command)["etc/kcp/host-identity"], command.name


def _bundle_files(command) -> dict[str, str]:
    raw = gzip.decompress(base64.b64decode(plain(command.inputs["stdin"])))
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        return {m.name: tar.extractfile(m).read().decode(errors="replace") for m in tar.getmembers() if m.isfile()}


def _waits_for(program: Program, name: str) -> set[str]:
    by_urn = {r.urn: r.name for r in program.resources}
    return {by_urn[u] for u in program.named(name).dependencies if u in by_urn}


def test_firewalls_change_host_after_host_each_after_its_member_follows_the_stack(declared) -> None:
    program = declared("local")
    hosts = ["h1", "h2", "h3", "spare1"]
    for before, host in itertools.pairwise(hosts):
        assert f"local-{before}-firewall" in _waits_for(program, f"local-{host}-firewall"), \
            f"{host}'s firewall may change together with {before}'s"
    for host in ("h1", "h2", "h3"):
        assert f"local-{host}-membership" in _waits_for(program, f"local-{host}-firewall")
        membership = program.named(f"local-{host}-membership").inputs["create"]
        assert "etcd-reconcile-members --members=h1=https://" in membership and "--spares=spare1=https://" in membership
    apply = program.named("local-h1-firewall").inputs["create"]
    assert "kcp-host firewall-apply --operators=10.250.0.0/24" in apply


def test_load_balancers_reload_one_at_a_time(declared) -> None:
    program = declared("local")
    assert "local-h1-loadbalancer" in _waits_for(program, "local-h2-loadbalancer")
    assert "local-h2-loadbalancer" in _waits_for(program, "local-h3-loadbalancer")


def test_backup_host_key_is_restricted_to_the_receiver(declared) -> None:
    receiver = declared("local").named("local-backup-receiver")
    assert "backup-host-setup etcd-backup /srv/etcd-backups/local" in receiver.inputs["create"]


def test_spares_watch_but_do_not_start_etcd(declared) -> None:
    names = {r.name for r in _commands(declared("local"))}
    assert "local-spare1-spare-watch" in names and "local-spare1-etcd-start" not in names


def test_a_second_run_declares_identical_commands_so_pulumi_up_changes_nothing(declared, throwaway_ssh_key) -> None:
    """Bundles are reproducible (fixed tar timestamps, sorted files): same config, same bytes, no diff. The first run
    is the session's (`declared`), the second a run of its own."""
    from tests.conftest import stack_for_tests
    from tests.program import ROOT, run_program

    cfg = stack_for_tests(ROOT / "stacks" / "Pulumi.local.yaml", throwaway_ssh_key)
    first, second = declared("local"), run_program(cfg, stack="local")
    before = {r.name: r.inputs for r in first.of_type(COMMAND)}
    after = {r.name: r.inputs for r in second.of_type(COMMAND)}
    assert before.keys() == after.keys()
    changed = [name for name in before if before[name] != after[name]]
    assert not changed, f"commands whose inputs change between identical runs: {changed}"
