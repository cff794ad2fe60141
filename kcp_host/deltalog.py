"""The delta log's one format: what the archiver writes, the receiver checks and the restore replays.

A chunk is UTF-8 JSON lines. Its first line is the header, then one line per revision, each revision
from `first` to `last` exactly once and in order (every etcd revision is one write transaction, so a
watch shows each one):

    {"format": 1, "kind": "etcd-delta", "cluster": C, "first": F, "last": L, "member": M,
     "closed_at": ISO, "leases": {"<id>": granted TTL}, "check": null | {"revision": R, "keys": K,
     "hashkv": H, "compact_revision": CR}}
    {"rev": F, "at": EPOCH, "ops": [["put", KEY_B64, VALUE_B64, LEASE_ID], ["del", KEY_B64]]}
    ...

`at` is when the archiver saw the revision (its clock); `leases` the granted TTL of every lease an op of
the chunk attaches; `check` what the live cluster answered at the chunk's close for revision R (its key
count and its hashkv, which covers the revisions after compaction point CR, so a replay compacted to CR
must answer the same). Standard library only: the same module runs on every host.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

FORMAT = 1
KIND = "etcd-delta"
# A revision as text: ASCII digits only (int() also takes "+1", " 1", "1_0" and other scripts' digits), bounded.
REVISION_TEXT = re.compile(r"[0-9]{1,19}")
# What chunk_name makes (16 digits, more once revisions need them), and the receiver's receipt beside it.
CHUNK_FILE = re.compile(r"([0-9]{16,19})-([0-9]{16,19})\.(delta|receipt)")
# In a bucket a chunk is named by its first revision only (its last is in the object's metadata and its header):
# created only if the name is new, so no two chunks there start at one revision.
BUCKET_CHUNK = re.compile(r"([0-9]{16,19})\.delta")
MAX_CHUNK_BYTES = 8 << 20  # a chunk closes early at this size; the receiver refuses larger ones
Op = tuple[str, str, str, int]  # ("put", key, value, lease) or ("del", key, "", 0); key and value in base64


class DeltaError(ValueError):
    """A chunk or a chain that is not what this format promises; the message says where."""


@dataclass(frozen=True)
class Revision:
    rev: int
    at: float
    ops: tuple[Op, ...]

    def line(self) -> str:
        ops = [list(op) if op[0] == "put" else ["del", op[1]] for op in self.ops]
        return json.dumps({"rev": self.rev, "at": round(self.at, 3), "ops": ops}, separators=(",", ":"))


@dataclass(frozen=True)
class Chunk:
    cluster: str
    member: str
    closed_at: str
    revisions: tuple[Revision, ...]
    leases: dict[int, int] = field(default_factory=dict)
    check: dict[str, int] | None = None

    @property
    def first(self) -> int:
        return self.revisions[0].rev

    @property
    def last(self) -> int:
        return self.revisions[-1].rev

    @property
    def name(self) -> str:
        return chunk_name(self.first, self.last)

    def header(self) -> dict[str, Any]:
        return {"format": FORMAT, "kind": KIND, "cluster": self.cluster, "first": self.first, "last": self.last,
                "member": self.member, "closed_at": self.closed_at,
                "leases": {str(lease): ttl for lease, ttl in sorted(self.leases.items())}, "check": self.check}

    def encode(self) -> bytes:
        lines = [json.dumps(self.header(), separators=(",", ":"), sort_keys=True)]
        return ("\n".join(lines + [r.line() for r in self.revisions]) + "\n").encode()


def chunk_name(first: int, last: int) -> str:
    """Sorts by revision as text; digits only, so a name cannot point anywhere else."""
    return f"{first:016d}-{last:016d}.delta"


def bucket_chunk_name(first: int) -> str:
    return f"{first:016d}.delta"


def ops_of(events: Iterable[dict[str, Any]]) -> tuple[Op, ...]:
    """etcdctl's `watch -w json` events (type 1 = DELETE) of one revision as ops, in the order etcd applied them."""
    ops: list[Op] = []
    for event in events:
        kv = event["kv"]
        if event.get("type") == 1:
            ops.append(("del", kv["key"], "", 0))
        else:
            ops.append(("put", kv["key"], kv.get("value", ""), int(kv.get("lease", 0))))
    return tuple(ops)


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise DeltaError(f"{what}: {value!r} is not a whole number")
    return value


def _when(value: Any) -> float:
    """A revision's `at`: seconds since the epoch, finite (--until TIME compares with it)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < float("inf"):
        raise DeltaError(f"at: {value!r} is not a time")
    return float(value)


def _op(raw: Any, rev: int) -> Op:
    try:
        if raw[0] == "put" and len(raw) == 4:
            base64.b64decode(raw[1], validate=True), base64.b64decode(raw[2], validate=True)
            return ("put", raw[1], raw[2], _int(raw[3], f"revision {rev}: lease"))
        if raw[0] == "del" and len(raw) == 2:
            base64.b64decode(raw[1], validate=True)
            return ("del", raw[1], "", 0)
    except (TypeError, IndexError, KeyError, ValueError) as error:
        raise DeltaError(f"revision {rev}: unreadable op ({error})") from None
    raise DeltaError(f"revision {rev}: unknown op {str(raw)[:80]}")


def decode(data: bytes) -> Chunk:
    """A chunk as written by Chunk.encode, every rule checked; DeltaError names the first one broken."""
    try:
        lines = data.decode().splitlines()
        head = json.loads(lines[0]) if lines else None
    except (UnicodeDecodeError, ValueError):
        raise DeltaError("the header is not a JSON line") from None
    if not isinstance(head, dict) or head.get("kind") != KIND or head.get("format") != FORMAT:
        raise DeltaError(f"not a delta chunk of format {FORMAT}")
    first, last = _int(head.get("first"), "first"), _int(head.get("last"), "last")
    if not 0 < first <= last:
        raise DeltaError(f"first {first} and last {last} are no revision range")
    rows: list[Revision] = []
    for number, text in enumerate(lines[1:], start=2):
        try:
            raw = json.loads(text)
            rev, at, ops = _int(raw["rev"], "rev"), _when(raw["at"]), raw["ops"]
        except (DeltaError, ValueError, KeyError, TypeError) as error:
            raise DeltaError(f"line {number}: not a revision ({error})") from None
        expected = first + len(rows)
        if rev != expected:
            raise DeltaError(f"line {number}: revision {rev} where {expected} must follow (a gap or an overlap)")
        if not isinstance(ops, list) or not ops:
            raise DeltaError(f"revision {rev}: no ops")
        rows.append(Revision(rev, at, tuple(_op(op, rev) for op in ops)))
    if not rows or rows[-1].rev != last:
        raise DeltaError(f"the revisions end at {rows[-1].rev if rows else first - 1}, the header says {last}")
    try:
        leases = {int(k): _int(v, "lease TTL") for k, v in (head.get("leases") or {}).items()}
    except (ValueError, AttributeError) as error:
        raise DeltaError(f"leases: {error}") from None
    check = head.get("check")
    if check is not None and not (isinstance(check, dict) and
                                  all(isinstance(check.get(k), int) for k in ("revision", "keys", "hashkv"))):
        raise DeltaError(f"check: {str(check)[:120]} lacks revision, keys or hashkv")
    return Chunk(str(head.get("cluster", "")), str(head.get("member", "")), str(head.get("closed_at", "")),
                 tuple(rows), leases, check)


def chain(chunks: Iterable[tuple[int, int]], after: int, until: int | None = None) -> list[tuple[int, int]]:
    """The (first, last) ranges that carry a store at revision `after` on to `until` (None: as far as they go),
    in order. Ranges ending at or before `after` play no part; the others must follow each other with no gap
    and no overlap, the first one holding revision after + 1, else DeltaError says where."""
    needed = sorted(r for r in chunks if r[1] > after)
    picked: list[tuple[int, int]] = []
    next_rev = after + 1
    for first, last in needed:
        if until is not None and next_rev > until:
            break
        if first > next_rev:
            raise DeltaError(f"gap: revisions {next_rev}..{first - 1} are in no chunk (the chain from revision "
                             f"{after} breaks there)")
        if first < next_rev and picked:
            raise DeltaError(f"overlap: chunk {first}..{last} repeats revisions up to {next_rev - 1}")
        picked.append((first, last))
        next_rev = last + 1
    if until is not None and next_rev <= until:
        raise DeltaError(f"revision {until} is not archived: the chain from revision {after} ends at {next_rev - 1}")
    return picked


def revisions(chunks: Iterable[Chunk], after: int, until: int | None = None) -> Iterator[Revision]:
    """The revisions after `after` up to `until` of chunks in chain order."""
    for chunk in chunks:
        for revision in chunk.revisions:
            if revision.rev > after and (until is None or revision.rev <= until):
                yield revision
