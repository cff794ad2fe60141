"""kcp-host: the host agent of resilient-control-plane, one program for everything that runs on hosts.

Member recovery, promotion, the spare watch, backups and their verification, the backup
receiver, the per-member restore steps, installs and the cloud boot path are subcommands
of `/usr/local/lib/kcp/kcp-host` (see `cli.py`). What it reads on a host is defined in
`contract.py`, which the renderer writes through. Standard library only, Python >= 3.11.
"""
