"""The operator's side of a restore (scripts/etcd-restore) and of the DR drill (scripts/dr-drill).

One job per module:
    plan.py         where the members and the backups are: the stack file (read_stack), overridden by flags
    ssh.py          ssh with one multiplexed connection per host
    sources.py      listing and picking snapshots: backup host, S3 bucket, local file
    stream.py       the snapshot stream (hashed once, as it passes) and its fan-out to every member
    members.py      `kcp-host etcd-restore-member` steps on the members, over SSH
    orchestrate.py  the restore sequence, its clock and its report
    drill.py        the DR drill's data checks and report
The host side is kcp_host/restore_member.py.
"""


class RestoreError(Exception):
    """A refusal or failure; the message says what was (not) changed."""
