"""Policies of the rendered backup job and the backup host's key entry."""

from __future__ import annotations

import re

import pytest

from components.render import backup
from kcp_host.contract import BackupEnv, load_env, parse_env_text

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAINOu4QrDyjJfs3GU6Br9EFCdg4lGBS2QDy3qU61fQNve etcd-backup@local"
DEST = "ssh://etcd-backup@10.250.0.20/srv/etcd-backups/local"


def files(**overrides: object) -> dict[str, str]:
    args: dict[str, object] = dict(cluster_name="local", dest=DEST, interval_minutes=15, verify=True,
                                   ssh_key_path="/etc/etcd/backup-ssh/id_ed25519")
    args.update(overrides)
    return backup.backup_host_files(**args)  # type: ignore[arg-type]


def env_of(text: str) -> dict[str, str]:
    return parse_env_text(text)


def test_every_etcd_host_gets_the_env_and_both_units() -> None:
    assert set(files()) == {"/etc/etcd/backup.env", "/etc/systemd/system/etcd-backup.service",
                            "/etc/systemd/system/etcd-backup.timer"}


def test_backup_env_is_what_the_agent_reads(tmp_path) -> None:
    path = tmp_path / "backup.env"
    path.write_text(files()["/etc/etcd/backup.env"])
    env = load_env(BackupEnv, str(path), environ={})
    assert env.dest == DEST and env.verify is True
    assert (env.cert, env.key) == ("/etc/etcd/pki/backup-client.crt", "/etc/etcd/pki/backup-client.key")
    assert env.ssh_key == "/etc/etcd/backup-ssh/id_ed25519"
    assert env.work_dir == BackupEnv.work_dir, "defaults come from the contract, not the file"


def test_backup_env_holds_paths_to_secrets_never_secrets() -> None:
    text = files()["/etc/etcd/backup.env"]
    assert "PRIVATE KEY" not in text and "BEGIN" not in text


@pytest.mark.parametrize("interval, schedule", [
    (15, "OnCalendar=*-*-* *:00/15:00"), (60, "OnCalendar=*-*-* 00/1:00:00"), (360, "OnCalendar=*-*-* 00/6:00:00"),
])
def test_timer_fires_on_wall_clock_slots_shared_by_all_members(interval: int, schedule: str) -> None:
    timer = files(interval_minutes=interval)["/etc/systemd/system/etcd-backup.timer"]
    assert schedule in timer.splitlines()


def test_timer_without_a_wall_clock_slot_falls_back_to_a_relative_interval() -> None:
    timer = files(interval_minutes=45)["/etc/systemd/system/etcd-backup.timer"]
    assert "OnUnitActiveSec=45min" in timer and "OnCalendar" not in timer


def test_timer_catches_up_missed_slots_with_a_small_random_delay() -> None:
    timer = files()["/etc/systemd/system/etcd-backup.timer"]
    assert "Persistent=true" in timer.splitlines()
    delay = re.search(r"^RandomizedDelaySec=(\d+)s$", timer, re.M)
    assert delay and int(delay.group(1)) <= 60, "randomized delay must stay small next to the interval"


def test_service_is_a_oneshot_running_the_backup_program_so_failures_fail_the_unit() -> None:
    service = files()["/etc/systemd/system/etcd-backup.service"]
    assert "Type=oneshot" in service.splitlines()
    assert "ExecStart=/usr/local/lib/kcp/kcp-host etcd-backup" in service.splitlines()
    assert "ExecStart=-" not in service, "a '-' prefix would hide failures"


def test_ssh_destination_needs_a_key() -> None:
    with pytest.raises(ValueError, match="ssh_key_path"):
        files(ssh_key_path=None)


@pytest.mark.parametrize("dest", ["gs://kcp-backups/prod", "s3://kcp-backups/prod"])
def test_bucket_destinations_need_no_ssh_key(dest: str) -> None:
    env = env_of(files(dest=dest, ssh_key_path=None)["/etc/etcd/backup.env"])
    assert env["KCP_BACKUP_DEST"] == dest and "KCP_BACKUP_SSH_KEY" not in env


@pytest.mark.parametrize("dest", ["http://10.0.0.1/x", "ssh://root@h/srv;rm -rf /", "file:///tmp", "gs://Bad Bucket"])
def test_unknown_or_unsafe_destinations_are_refused(dest: str) -> None:
    with pytest.raises(ValueError, match="destination"):
        files(dest=dest)


def test_retention_must_keep_at_least_one_recent_snapshot() -> None:
    with pytest.raises(ValueError, match="retention"):
        backup.backup_receiver_authorized_key(KEY, "/srv/etcd-backups", "local", 0, 3)


def test_ssh_destination_points_at_the_clusters_own_folder() -> None:
    assert backup.ssh_destination("etcd-backup", "10.250.0.20", "/srv/etcd-backups/", "local") == DEST


def test_backup_key_is_restricted_to_the_receive_program_for_this_cluster() -> None:
    line = backup.backup_receiver_authorized_key(KEY, "/srv/etcd-backups", "local", 4, 3)
    options, _, key = line.strip().partition(" ssh-ed25519 ")
    assert options.startswith("restrict,"), "no forwarding, no pty, no user rc"
    assert options == ('restrict,command="/usr/local/lib/kcp/kcp-host etcd-backup-receive '
                       '--root /srv/etcd-backups/local --retain-recent 4 --retain-daily 3 --max-bytes 17179869184"')
    assert ("ssh-ed25519 " + key) == KEY and line.endswith("\n") and line.count("\n") == 1


def test_the_size_bound_is_always_on_the_command_line_and_covers_a_full_etcd() -> None:
    """The receiver refuses a larger upload; etcd's 8 GiB quota (render/etcd.py) keeps a real snapshot below it."""
    line = backup.backup_receiver_authorized_key(KEY, "/srv/etcd-backups", "local", 4, 3, max_bytes=1 << 20)
    assert line.split('"')[1].endswith(" --max-bytes 1048576"), line
    assert backup.SNAPSHOT_MAX_BYTES >= 8 * 1024**3
    with pytest.raises(ValueError, match="size bound"):
        backup.backup_receiver_authorized_key(KEY, "/srv/etcd-backups", "local", 4, 3, max_bytes=0)


@pytest.mark.parametrize("bad_key", [
    "", "ssh-ed25519", 'ssh-ed25519 AAAA" command="sh', "ssh-ed25519 AAAA\nssh-rsa BBBB", "ssh-dss AAAA",
])
def test_malformed_or_injected_public_keys_are_refused(bad_key: str) -> None:
    with pytest.raises(ValueError, match="public key"):
        backup.backup_receiver_authorized_key(bad_key, "/srv/etcd-backups", "local", 4, 3)


@pytest.mark.parametrize("path, cluster", [("srv/relative", "local"), ("/srv/etcd backups", "local"),
                                           ("/srv/etcd-backups", "../other"), ("/srv/etcd-backups", "a b")])
def test_receiver_root_cannot_escape_or_break_the_forced_command(path: str, cluster: str) -> None:
    with pytest.raises(ValueError):
        backup.backup_receiver_authorized_key(KEY, path, cluster, 4, 3)
