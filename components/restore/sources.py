"""Where a restore's snapshot comes from: the backup host, an S3 or GCS bucket, or a local file.

Each source lists what it holds as the metadata written beside every snapshot (name, revision,
keys, hashkv, sha256, verified, ...) plus `file_bytes`, picks one by `pick_backup`'s rules, and
opens its bytes as a stream (`Fetch`) for the members. Each can also hold the delta log (`DeltaLog`: the backup
host's chunks and their receipts, a bucket's `deltas/<cluster ID>/`, a local folder of chunks downloaded from one),
which components/restore/deltas.py replays onto a snapshot.
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import shutil
import subprocess
import tempfile
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any, ClassVar, Protocol, runtime_checkable

from components.restore import RestoreError
from components.restore.ssh import Ssh
from kcp_host import deltalog
from kcp_host.files import widen_pipe

CHUNKS_PER_READ = 200  # chunk files per `cat` on the backup host: one round trip each, a bounded command line


def pick_backup(backups: Sequence[dict[str, Any]], wanted: str | None) -> dict[str, Any]:
    """The newest verified snapshot by the store's own arrival record (`arrived`: the backup host's receipt, S3's
    LastModified), or the named one. Never restored: a snapshot marked bad, one whose store record contradicts its
    metadata (`refused`: why), and by default one without an arrival record (it is still restored by name).

    Names and times inside the metadata are the uploader's word, so they choose nothing: a snapshot named for
    the year 9999 is as old as its arrival.
    """
    if wanted:
        match = [b for b in backups if b.get("name") == wanted]
        if not match:
            raise RestoreError(f"no snapshot named {wanted}")
        chosen = next((b for b in match if not b.get("refused")), match[0])
        if chosen.get("refused"):
            raise RestoreError(f"{wanted}: {chosen['refused']}; refusing it")
        if chosen.get("verified") is False:
            raise RestoreError(f"{wanted} failed verification ({chosen.get('verify_error')}); refusing it")
        return chosen
    verified = [b for b in backups
                if b.get("verified") is True and not b.get("refused") and b.get("arrived") is not None]
    if not verified:
        raise RestoreError("no verified snapshot found" + (" with a record of its arrival (name one with --snapshot)"
                                                           if any(b.get("verified") is True for b in backups) else ""))
    return max(verified, key=lambda b: (b["arrived"], b["name"]))


@dataclass
class Fetch:
    """A snapshot's bytes as they are read, and whether reading them failed (known once they are read)."""

    stream: IO[bytes]
    proc: subprocess.Popen[bytes] | None = None  # the remote reader, if any
    origin: str = ""

    def failure(self, count: int) -> str | None:
        """Why reading failed after `count` bytes, or None; call it after the stream was read."""
        if self.proc is None or self.proc.wait(timeout=60) == 0:
            return None
        detail = self.proc.stderr.read().decode().strip() if self.proc.stderr else ""
        return f"fetching from {self.origin} failed after {count} bytes: {detail}"


class Source(Protocol):
    def where(self) -> str:
        """Where the snapshots are, for the operator."""
        ...

    def pick(self, wanted: str | None) -> dict[str, Any]:
        """The wanted (or newest verified) snapshot's metadata, with `file_bytes`."""
        ...

    def open(self, meta: dict[str, Any]) -> Fetch:
        ...

    def close(self) -> None:
        """Release what the source holds (connections, downloaded copies)."""
        ...


@runtime_checkable
class DeltaLog(Source, Protocol):
    """A source that also holds the delta log (chunks of revisions after its snapshots)."""

    def pick(self, wanted: str | None, keep: Callable[[dict[str, Any]], bool] | None = None) -> dict[str, Any]:
        ...

    def deltas(self, base: dict[str, Any]) -> list[dict[str, Any]]:
        """The chunks that may carry `base` on: each with its `name`, `first`, `last`, `bytes` and `sha256`, and
        `refused` where the store's record contradicts it."""
        ...

    def fetch_deltas(self, chunks: Sequence[dict[str, Any]]) -> Generator[bytes, None, None]:
        ...

    def set_deltas_aside(self, name: str) -> bool:
        ...


def received(meta_text: str, receipt_text: str, size: str, mtime: str, file_name: str) -> dict[str, Any]:
    """One pair of the backup host's folder as the restore sees it: its metadata, `file_bytes`, `arrived` (the
    receipt's, else the .json's mtime: both the backup host's clock), and `refused` where the receipt, written
    by the receiver from what it received, contradicts the metadata (changed since it arrived)."""
    meta, receipt = json.loads(meta_text), json.loads(receipt_text or "{}")
    entry = {**meta, "file_bytes": int(size), "arrived": receipt.get("arrived", float(mtime)),
             "arrived_at": receipt.get("arrived_at")}
    if f"{meta.get('name')}.json" != file_name:
        entry["refused"] = f"its metadata names another snapshot than its file {file_name}"
    elif receipt and (receipt.get("name"), receipt.get("sha256")) != (meta.get("name"), meta.get("sha256")):
        entry["refused"] = "its metadata differs from what the backup host recorded on its arrival"
    elif receipt and receipt.get("bytes") != entry["file_bytes"]:
        entry["refused"] = f"its .db has {size} bytes, the backup host received {receipt.get('bytes')}"
    return entry


def canonical_chunk(name: str) -> bool:
    """A name deltalog.chunk_name makes (zero-padded digits, first <= last): anything else is no chunk."""
    match = deltalog.CHUNK_FILE.fullmatch(name)
    return bool(match) and int(match[1]) <= int(match[2]) and deltalog.chunk_name(int(match[1]), int(match[2])) == name


def chunk_received(name: str, size: str, receipt_text: str) -> dict[str, Any]:
    """One chunk of the backup host's delta log as the restore sees it: its range (from its name, which the
    receiver made from the checked header), its size, and its receipt's sha256 and bytes; `refused` where there
    is no receipt for it or the receipt contradicts the file."""
    first, last = (int(n) for n in name.removesuffix(".delta").split("-"))
    entry: dict[str, Any] = {"name": name, "first": first, "last": last, "file_bytes": int(size)}
    try:
        receipt = json.loads(receipt_text) if receipt_text.strip() else None
    except ValueError:
        receipt = None
    if not isinstance(receipt, dict) or not isinstance(receipt.get("sha256"), str):
        return {**entry, "refused": "no receipt of its arrival"}
    entry |= {"sha256": receipt["sha256"], "bytes": receipt.get("bytes"), "arrived": receipt.get("arrived"),
              "arrived_at": receipt.get("arrived_at")}
    if (receipt.get("name"), receipt.get("first"), receipt.get("last")) != (name, first, last):
        entry["refused"] = "its receipt is another chunk's"
    elif receipt.get("bytes") != entry["file_bytes"]:
        entry["refused"] = f"its file has {size} bytes, the backup host received {receipt.get('bytes')}"
    return entry


@dataclass
class BackupFolder:
    """The folder of one cluster on the backup host, read over SSH.

    `user` logs in to list and read (None: the SSH user). Not the stack's backupHost.user: that is
    the receiver's forced-command user, which can only add files, never list or read them.
    """

    ssh: Ssh
    address: str | None
    directory: str | None
    user: str | None = None
    delta_dir: str = "deltas"  # the delta log in it; an earlier one a restore set aside: `deltas.before-restore-*`

    def where(self) -> str:
        return f"{self.address}:{self.directory}"

    def listing(self) -> list[dict[str, Any]]:
        """Metadata of the snapshots kept there (bad/ ones are not listed), each with what the receiver recorded
        on its arrival (`NAME.receipt`: arrival time, the sha256 it computed, the size). `file_bytes` is -1 for a
        .db file that is missing; a pair filed before receipts existed arrived when its .json was written."""
        if not (self.address and self.directory):
            raise RestoreError("no backup location: give --stack with baremetal.backupHost, or --backup-host "
                               "and --backup-path, or --snapshot-file and --metadata")
        script = ('for f in "$1"/*.json; do [ "$f" = "$1/status.json" ] || [ ! -f "$f" ] || { cat "$f"; '
                  'printf "\\037"; cat "${f%.json}.receipt" 2>/dev/null; printf "\\037%s\\037%s\\037%s\\036" '
                  '"$(stat -c %s "${f%.json}.db" 2>/dev/null || echo -1)" "$(stat -c %Y "$f")" "${f##*/}"; }; done')
        proc = self.ssh.run(self.address, f"sh -c {shlex.quote(script)} sh {shlex.quote(self.directory)}",
                            user=self.user, timeout=60)
        if proc.returncode != 0:
            raise RestoreError(f"cannot list {self.directory} on {self.address}: {proc.stderr.decode().strip()}")
        return [received(*doc.split("\x1f")) for doc in filter(str.strip, proc.stdout.decode().split("\x1e"))]

    def pick(self, wanted: str | None, keep: Callable[[dict[str, Any]], bool] | None = None) -> dict[str, Any]:
        """pick_backup's choice among the snapshots `keep` accepts (all by default), whose .db is there."""
        meta = pick_backup([b for b in self.listing() if keep is None or keep(b)], wanted)
        if meta["file_bytes"] < 0:
            raise RestoreError(f"{meta['name']}.db is missing beside its metadata on {self.address}")
        return meta

    def open(self, meta: dict[str, Any]) -> Fetch:
        """`cat` on the backup host, as root like the listing."""
        assert self.address and self.directory
        path = f"{self.directory}/{meta['name']}.db"
        proc = self.ssh.popen(self.address, f"cat {shlex.quote(path)}", user=self.user)
        assert proc.stdout
        widen_pipe(proc.stdout)
        return Fetch(proc.stdout, proc, self.address)

    def deltas(self, base: dict[str, Any]) -> list[dict[str, Any]]:
        """The delta log's chunks under `delta_dir` (only names deltalog.chunk_name makes), each with its range, its
        size and what the receiver recorded on its arrival (sha256, bytes); `refused` where that record is missing
        or contradicts the file, which no restore then replays. One log for every snapshot: a restore moves it
        aside."""
        assert self.address and self.directory
        script = ('for f in "$1"/*.delta; do case "${f##*/}" in *[!0-9a-z.-]*) continue ;; esac; '
                  '[ -f "$f" ] || continue; printf "%s\\037%s\\037" "${f##*/}" "$(stat -c %s "$f" || echo -1)"; '
                  'cat "${f%.delta}.receipt" 2>/dev/null; printf "\\036"; done')
        proc = self.ssh.run(self.address, f"sh -c {shlex.quote(script)} sh "
                            f"{shlex.quote(f'{self.directory}/{self.delta_dir}')}", user=self.user, timeout=60)
        if proc.returncode != 0:
            raise RestoreError(f"cannot list the delta log in {self.directory}/{self.delta_dir} on {self.address}: "
                               f"{proc.stderr.decode().strip()}")
        docs = (doc.split("\x1f", 2) for doc in proc.stdout.decode(errors="replace").split("\x1e") if doc.strip())
        return [chunk_received(*doc) for doc in docs if len(doc) == 3 and canonical_chunk(doc[0])]

    def set_deltas_aside(self, name: str) -> bool:
        """Move deltas/ to `name` beside it (kept, never deleted); False when there was none. A restore starts a new
        history: the archiver then begins a new chain after the restored cluster's first snapshot."""
        assert self.address and self.directory
        script = 'if [ -d "$1/deltas" ]; then mv -T "$1/deltas" "$1/$2"; else exit 3; fi'
        proc = self.ssh.run(self.address, f"sh -c {shlex.quote(script)} sh {shlex.quote(self.directory)} "
                            f"{shlex.quote(name)}", user=self.user, timeout=60)
        if proc.returncode not in (0, 3):
            raise RestoreError(f"cannot move {self.directory}/deltas aside on {self.address}: "
                               f"{proc.stderr.decode().strip()}")
        return proc.returncode == 0

    def fetch_deltas(self, chunks: Sequence[dict[str, Any]]) -> Generator[bytes, None, None]:
        """The chunks' bytes, in the given order, each checked against its receipt before it is handed out: the
        receiver hashed it as it arrived, so a chunk changed on the backup host since is refused. A few hundred
        chunks per `cat`, read one at a time; stop early and the reader is ended."""
        assert self.address and self.directory
        for start in range(0, len(chunks), CHUNKS_PER_READ):
            batch = chunks[start:start + CHUNKS_PER_READ]
            paths = [f"{self.directory}/{self.delta_dir}/{c['name']}" for c in batch]
            proc = self.ssh.popen(self.address, shlex.join(["cat", "--", *paths]), user=self.user)
            assert proc.stdout
            try:
                for chunk in batch:
                    data = proc.stdout.read(int(chunk["bytes"]))
                    digest = hashlib.sha256(data).hexdigest()
                    if (len(data), digest) != (chunk["bytes"], chunk["sha256"]):
                        short = len(data) < chunk["bytes"] and Fetch(proc.stdout, proc, self.address).failure(len(data))
                        raise RestoreError(f"delta chunk {chunk['name']} on {self.address} is not the one that arrived "
                                           f"(read {len(data)} bytes, sha256 {digest}; its receipt says "
                                           f"{chunk['bytes']} bytes, sha256 {chunk['sha256']}"
                                           f"{f'; {short}' if short else ''}): refusing it")
                    yield data
            finally:
                proc.kill()
                proc.wait()

    def close(self) -> None:
        if self.address:
            self.ssh.close([self.address], self.user)


@dataclass
class LocalFile:
    """A snapshot on the operator's machine (e.g. downloaded from a bucket) with its metadata file."""

    path: Path
    metadata: Path | None

    def where(self) -> str:
        return str(self.path)

    def pick(self, wanted: str | None, keep: Callable[[dict[str, Any]], bool] | None = None) -> dict[str, Any]:
        if not self.metadata:
            raise RestoreError("--snapshot-file needs --metadata (the .json written beside it)")
        if not self.path.is_file():
            raise RestoreError(f"--snapshot-file {self.path}: no such file")
        stat = self.path.stat()  # the operator chose this file: its own time is its arrival
        meta = {**json.loads(self.metadata.read_text()), "file_bytes": stat.st_size, "arrived": stat.st_mtime}
        if keep is not None and not keep(meta):
            raise RestoreError(f"--snapshot-file {self.path} (revision {meta.get('revision')}, taken "
                               f"{meta.get('taken_at')}) is not at or before it")
        return pick_backup([meta], wanted)

    def open(self, meta: dict[str, Any]) -> Fetch:
        return Fetch(self.path.open("rb"))

    def close(self) -> None:
        """Nothing to release: the file is the operator's."""


@dataclass
class ChunkFolder:
    """Delta log chunks as files in a local folder, named as a bucket names them (`<first revision>.delta`): a
    bucket's `deltas/<cluster ID>/` downloaded. A chunk's range is its header's; one whose name says another first
    revision, or whose header is unreadable, is refused. Each file is hashed as it is listed and checked when read."""

    path: Path

    def deltas(self, refused: dict[str, str] | None = None) -> list[dict[str, Any]]:
        """Every chunk's entry; `refused`: names the store itself refused, and why."""
        entries = []
        for file in sorted(self.path.glob("*.delta")) if self.path.is_dir() else ():
            match = deltalog.BUCKET_CHUNK.fullmatch(file.name)
            if not match or not file.is_file():
                continue
            data, first = file.read_bytes(), int(match[1])
            entry: dict[str, Any] = {"name": file.name, "first": first, "last": first, "file_bytes": len(data),
                                     "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            try:
                head = json.loads(data.split(b"\n", 1)[0])
                entry["last"] = int(head["last"])
                if int(head["first"]) != first:
                    entry["refused"] = f"its header says it starts at revision {head['first']}"
            except (ValueError, KeyError, TypeError):
                entry["refused"] = "its first line is no chunk header"
            if refused and file.name in refused:
                entry["refused"] = refused[file.name]
            entries.append(entry)
        return entries

    def fetch(self, chunks: Sequence[dict[str, Any]]) -> Generator[bytes, None, None]:
        for chunk in chunks:
            data = (self.path / chunk["name"]).read_bytes()
            if hashlib.sha256(data).hexdigest() != chunk["sha256"]:
                raise RestoreError(f"delta chunk {chunk['name']} in {self.path} changed since it was listed: "
                                   "refusing it")
            yield data


UPLOAD_SKEW = timedelta(minutes=15)  # SigV4 refuses a request signed by a clock further off than this


def utc_time(stamp: object) -> datetime | None:
    """An ISO 8601 time (a snapshot's taken_at, S3's LastModified), UTC where it names no zone; None if absent or
    unreadable."""
    try:
        when = datetime.fromisoformat(str(stamp)) if stamp else None
    except ValueError:
        return None
    return when if when is None or when.tzinfo else when.replace(tzinfo=UTC)


def chunk_selection(listed: Iterable[tuple[str, datetime | None]], after: int,
                    taken: datetime) -> tuple[int, list[str]]:
    """Which of the bucket chunks (name, arrival) a restore from the snapshot at revision `after` reads: every chunk
    from the returned first revision on (the last one named at or before after + 1: it may hold that revision; the
    chain from `after` starts there, deltalog.chain), and the returned names before it. Chunks named earlier end
    before it as the archivers write them; those that arrived after the snapshot was taken are read all the same: a
    forged one there overlaps the chain's first chunk, which the chain refuses, as when the whole log was read."""
    chunks = [(name, when, int(match[1])) for name, when in listed if (match := deltalog.BUCKET_CHUNK.fullmatch(name))]
    start = max((first for _, _, first in chunks if first <= after + 1), default=after + 1)
    late = [name for name, when, first in chunks if first < start and (when is None or when >= taken - UPLOAD_SKEW)]
    return start, late


def chunks_to_read(listed: Iterable[tuple[str, datetime | None]], after: int, taken: datetime | None) -> list[str]:
    """--include patterns (the AWS CLI's) for chunk_selection's chunks; the whole log when `taken` is unknown."""
    if taken is None:
        return ["*"]
    start, late = chunk_selection(listed, after, taken)
    return [*names_from(start), *late]


def chunk_names(listed: Sequence[tuple[str, datetime | None]], after: int, taken: datetime | None) -> list[str]:
    """The names of chunk_selection's chunks among `listed`; every chunk when `taken` is unknown."""
    if taken is None:
        return [name for name, _ in listed if deltalog.BUCKET_CHUNK.fullmatch(name)]
    start, late = chunk_selection(listed, after, taken)
    return [name for name, _ in listed if (match := deltalog.BUCKET_CHUNK.fullmatch(name))
            and (int(match[1]) >= start or name in late)]


def names_from(first: int) -> list[str]:
    """Patterns (the AWS CLI's --include) matching the bucket chunk names of chunks starting at `first` or later: the
    name itself, each name of its width that is larger at its first differing digit, and every longer name."""
    digits = deltalog.bucket_chunk_name(first).removesuffix(".delta")
    larger = [f"{digits[:at]}[{int(digit) + 1}-9]{'?' * (len(digits) - at - 1)}.delta"
              for at, digit in enumerate(digits) if digit != "9"]
    return [f"{digits}.delta", *larger, f"{'?' * (len(digits) + 1)}*.delta"]


@dataclass
class LocalFileWithDeltas(LocalFile):
    """A local snapshot and a local folder of the chunks after it (`--delta-dir`: e.g. a GCS bucket's
    `deltas/<cluster ID>/`, downloaded with `gcloud storage cp -r`)."""

    delta_dir: Path = Path()

    def deltas(self, base: dict[str, Any]) -> list[dict[str, Any]]:
        if not self.delta_dir.is_dir():
            raise RestoreError(f"--delta-dir {self.delta_dir}: no such folder")
        return ChunkFolder(self.delta_dir).deltas()

    def fetch_deltas(self, chunks: Sequence[dict[str, Any]]) -> Generator[bytes, None, None]:
        return ChunkFolder(self.delta_dir).fetch(chunks)

    def set_deltas_aside(self, name: str) -> bool:
        """The folder is the operator's; the bucket it came from keeps each cluster's log apart already."""
        return False


UPLOAD_OVER_SNAPSHOT = "an upload over an earlier snapshot of the same name"


def uploads_over_chunks(listed: list[tuple[str, datetime | None]], kind: str) -> dict[str, str]:
    """Chunk names listed more than once, refused: the archivers create each once, so a second `kind` (what the
    store calls a kept rewrite) is an upload over a chunk."""
    counts = Counter(name for name, _ in listed)
    return {name: f"more than one {kind}: an upload over a chunk" for name, n in counts.items() if n > 1}


class BucketBackups(ABC):
    """Snapshots in a bucket backupLocation, read with the operator's own cloud CLI and credentials.

    The layout is docs/backups.md's: one object per snapshot, `<prefix>/snapshots/<name>.db`, carrying the
    snapshot's metadata (name, revision, sha256, ...) as object metadata, under a retention lock that keeps it for
    its period; the delta log of each etcd cluster under `<prefix>/deltas/<cluster ID>/`. Snapshots are read by the
    store's own arrival time, newest first, and the chosen one is downloaded into a private scratch dir before
    anything else. Subclasses say how their CLI lists and downloads.
    """

    SCHEME: ClassVar[str]
    CLI: ClassVar[str]

    def __init__(self, url: str) -> None:
        bucket, _, prefix = url.removeprefix(self.SCHEME).partition("/")
        if not url.startswith(self.SCHEME) or not bucket:
            raise RestoreError(f"--bucket {url}: expected {self.SCHEME}BUCKET/PREFIX (the stack's backupLocation)")
        self.url, self.bucket, self.prefix = url, bucket, prefix.strip("/")
        self.scratch: Path | None = None
        self.chunks = ChunkFolder(Path())  # the delta log once `deltas` downloaded it

    def where(self) -> str:
        return self.url

    def folder(self, name: str) -> str:
        """A folder's key prefix in the bucket (`snapshots/`, `deltas/<cluster ID>/`)."""
        return f"{self.prefix}/{name}/".lstrip("/")

    def cli(self, argv: list[str], what: str, stdin: str | None = None, timeout: int = 600) -> str:
        """One call of the cloud's CLI; its stdout. RestoreError, naming `what`, when it fails or is missing."""
        try:
            proc = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=timeout, check=False)
        except FileNotFoundError:
            raise RestoreError(f"--bucket {self.SCHEME}... needs the {self.CLI} CLI on this machine") from None
        if proc.returncode != 0:
            raise RestoreError(f"{what} on {self.url} failed: {proc.stderr.strip()}")
        return proc.stdout

    def scratch_dir(self) -> Path:
        if not self.scratch:
            self.scratch = Path(tempfile.mkdtemp(prefix="kcp-restore-download-"))
        return self.scratch

    def snapshot(self, key: str, tags: dict[str, str], size: int, arrived: object) -> dict[str, Any]:
        """A snapshot object as the restore sees it: its metadata from the object's, `refused` where that lacks a
        number or names another snapshot than its key."""
        entry = {"name": key.removeprefix(self.folder("snapshots")).removesuffix(".db"),
                 "taken_at": tags.get("taken-at"), "sha256": tags.get("sha256"),
                 "verified": tags.get("verified") == "true", "cluster_id": tags.get("cluster-id"), "file_bytes": size,
                 "arrived": arrived, "_key": key}
        try:
            entry |= {field: int(tags[field]) for field in ("revision", "keys", "hashkv")}
        except (KeyError, ValueError):
            entry["refused"] = "its object metadata lacks revision, keys or hashkv"
        if tags.get("name") != entry["name"]:
            entry["refused"] = f"its object metadata names {tags.get('name')!r}"
        return entry

    @abstractmethod
    def listing(self) -> Iterator[dict[str, Any]]:
        """Each snapshot's entry (`snapshot`), newest arrival first."""

    @abstractmethod
    def download(self, meta: dict[str, Any], target: Path) -> None:
        """The very object `listing` listed as `meta`, into `target`."""

    @abstractmethod
    def chunk_listing(self, folder: str) -> tuple[list[tuple[str, datetime | None]], dict[str, str]]:
        """The delta log's chunk names in `folder` with their arrival, and the names refused, with why."""

    @abstractmethod
    def download_chunks(self, folder: str, listed: list[tuple[str, datetime | None]], after: int,
                        taken: datetime | None) -> None:
        """The chunks of `listed` that a chain from revision `after` may use (chunk_selection), into self.chunks."""

    def pick(self, wanted: str | None, keep: Callable[[dict[str, Any]], bool] | None = None) -> dict[str, Any]:
        """The newest verified snapshot (among those `keep` accepts), or the named one (pick_backup's rules),
        downloaded."""
        seen: list[dict[str, Any]] = []
        for meta in self.listing():
            if keep is not None and not keep(meta):
                continue
            seen.append(meta)
            if not meta.get("refused") and (meta["name"] == wanted or (wanted is None and meta["verified"])):
                break
        meta = pick_backup(seen, wanted)
        meta["local_file"] = self.scratch_dir() / "snapshot.db"  # not the name: the uploader chose it
        self.download(meta, meta["local_file"])
        return meta

    def open(self, meta: dict[str, Any]) -> Fetch:
        return Fetch(Path(meta["local_file"]).open("rb"))

    def deltas(self, base: dict[str, Any]) -> list[dict[str, Any]]:
        """The chunks of the delta log of the cluster `base` was taken of (`deltas/<its cluster ID>/`, each etcd
        cluster's own: a restore makes a new one) that can carry it on, downloaded into the scratch dir: a log kept
        for days holds thousands of chunks from before the snapshot, which no chain from it uses. None for a
        snapshot that records no cluster ID (taken before the delta log came to the clouds)."""
        history = base.get("cluster_id")
        if not (isinstance(history, str) and re.fullmatch(r"[0-9a-f]{16}", history)):
            return []
        folder = self.folder(f"deltas/{history}")
        listed, refused = self.chunk_listing(folder)
        self.chunks = ChunkFolder(self.scratch_dir() / "deltas")
        if listed:
            self.download_chunks(folder, listed, int(base["revision"]), utc_time(base.get("taken_at")))
        return self.chunks.deltas(refused)

    def fetch_deltas(self, chunks: Sequence[dict[str, Any]]) -> Generator[bytes, None, None]:
        return self.chunks.fetch(chunks)

    def set_deltas_aside(self, name: str) -> bool:
        """Nothing to move: the restored cluster has a new cluster ID, so its archivers start a log of their own."""
        return False

    def close(self) -> None:
        """Delete the downloaded copies: they hold every secret of the cluster."""
        if self.scratch:
            shutil.rmtree(self.scratch, ignore_errors=True)
            self.scratch = None


class S3Backups(BucketBackups):
    """An S3 bucket with Object Lock, through the `aws` CLI: the lock keeps every version for its retention, so a
    key's first version is the snapshot; a later one is an upload over it (the lock kept the first). Versions are
    read newest LastModified (S3's clock) first, each one's metadata only until the wanted one is found."""

    SCHEME, CLI = "s3://", "AWS (`aws`)"

    def aws(self, *args: str) -> Any:
        """One `aws s3api` call; its JSON answer."""
        return json.loads(self.cli(["aws", "s3api", *args, "--bucket", self.bucket, "--output", "json"],
                                   f"aws s3api {args[0]}") or "{}")

    def listing(self) -> Iterator[dict[str, Any]]:
        """A version whose metadata names another snapshot than its key, and a later version of a key, are listed
        as refused."""
        found = [v for v in self.aws("list-object-versions", "--prefix", self.folder("snapshots")).get("Versions", [])
                 if v["Key"].endswith(".db")]
        first: dict[str, dict[str, Any]] = {}
        for v in found:  # the oldest version of each key; on a tie the later listed (S3 lists newest first)
            if v["Key"] not in first or v["LastModified"] <= first[v["Key"]]["LastModified"]:
                first[v["Key"]] = v
        for version in sorted(found, key=lambda v: v["LastModified"], reverse=True):
            head = self.aws("head-object", "--key", version["Key"], "--version-id", version["VersionId"])
            entry = self.snapshot(version["Key"], head.get("Metadata", {}), int(head["ContentLength"]),
                                  version["LastModified"])
            entry["_version"] = version["VersionId"]
            if version is not first[version["Key"]]:
                entry["refused"] = UPLOAD_OVER_SNAPSHOT
            yield entry

    def download(self, meta: dict[str, Any], target: Path) -> None:
        self.aws("get-object", "--key", meta["_key"], "--version-id", meta["_version"], str(target))

    def chunk_listing(self, folder: str) -> tuple[list[tuple[str, datetime | None]], dict[str, str]]:
        """A key with more than one version is refused: the archivers create each key once, so a second version is
        an upload over a chunk."""
        versions = self.aws("list-object-versions", "--prefix", folder).get("Versions", [])
        listed = [(v["Key"].removeprefix(folder), utc_time(v["LastModified"])) for v in versions]
        return listed, uploads_over_chunks(listed, "version")

    def download_chunks(self, folder: str, listed: list[tuple[str, datetime | None]], after: int,
                        taken: datetime | None) -> None:
        includes = [arg for pattern in chunks_to_read(listed, after, taken) for arg in ("--include", pattern)]
        self.cli(["aws", "s3", "cp", "--recursive", "--only-show-errors", f"s3://{self.bucket}/{folder}",
                  str(self.chunks.path), "--exclude", "*", *includes], "downloading the delta log", timeout=3600)


class GcsBackups(BucketBackups):
    """A GCS bucket under a retention policy, through `gcloud storage`: GCS lists each object's metadata with its
    name, and the policy lets no one replace or delete an object before its period ends. The listing has every
    generation of a name (`objects list` includes noncurrent ones, which only a versioned bucket keeps): as on
    S3, the first is the snapshot or chunk and a later one an upload over it. The download names the generation
    listed: one replaced since is not read."""

    SCHEME, CLI = "gs://", "Google Cloud (`gcloud`)"

    def objects(self, pattern: str) -> list[dict[str, Any]]:
        """The objects matching `pattern` in the bucket, as the JSON API describes them (`--raw`)."""
        found = json.loads(self.cli(["gcloud", "storage", "objects", "list", f"gs://{self.bucket}/{pattern}",
                                     "--format=json", "--raw"], "gcloud storage objects list") or "[]")
        return [item for item in found if isinstance(item, dict)]

    def listing(self) -> Iterator[dict[str, Any]]:
        entries, seen = [], set()
        snapshots = self.objects(f"{self.folder('snapshots')}*.db")
        for item in sorted(snapshots, key=lambda item: int(item["generation"])):  # a name's first generation first
            created = utc_time(item.get("timeCreated"))
            entry = self.snapshot(item["name"], item.get("metadata") or {}, int(item["size"]),
                                  created.timestamp() if created else None)
            if item["name"] in seen:
                entry["refused"] = UPLOAD_OVER_SNAPSHOT
            seen.add(item["name"])
            entries.append({**entry, "_generation": str(item["generation"])})
        yield from sorted(entries, key=lambda e: e["arrived"] or 0, reverse=True)

    def download(self, meta: dict[str, Any], target: Path) -> None:
        self.cli(["gcloud", "storage", "cp", "--quiet", f"gs://{self.bucket}/{meta['_key']}#{meta['_generation']}",
                  str(target)], "gcloud storage cp")

    def chunk_listing(self, folder: str) -> tuple[list[tuple[str, datetime | None]], dict[str, str]]:
        listed = [(str(item["name"]).removeprefix(folder), utc_time(item.get("timeCreated")))
                  for item in self.objects(f"{folder}*.delta")]
        return listed, uploads_over_chunks(listed, "generation")

    def download_chunks(self, folder: str, listed: list[tuple[str, datetime | None]], after: int,
                        taken: datetime | None) -> None:
        """One `gcloud storage cp -I` for all of them, their names on its stdin."""
        names = chunk_names(listed, after, taken)
        self.chunks.path.mkdir(parents=True, exist_ok=True)
        self.cli(["gcloud", "storage", "cp", "--quiet", "-I", str(self.chunks.path)], "downloading the delta log",
                 stdin="".join(f"gs://{self.bucket}/{folder}{name}\n" for name in names), timeout=3600)
