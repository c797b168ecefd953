"""Shard checksums of the checkpoints the course builds, checked whenever a local checkpoint is loaded.

A course checkpoint carries `xcomp-lab-manifest.json`: the size and SHA-256 of each safetensors shard and the
way to rebuild it. `verify_checkpoint()` checks every shard's safetensors header against the file's size (cheap,
for any checkpoint: it catches empty and truncated shards) and, where a manifest exists, each shard's size and
checksum, raising `DamagedCheckpointError` naming the shard and the fix. Real checkpoints (a Hub download, a
folder `save_pretrained` wrote) have no manifest: only their headers are checked, and damage inside their tensor
data goes unnoticed.

Hashing costs, measured on the course's 2-core AMD EPYC VM (CPU with SHA-NI, Python 3.11 hashlib.file_digest,
one 1.5 GiB file, best of two runs; the VM was shared with other jobs): sha256 0.98 GB/s from the page cache and
0.55 GB/s from disk, blake2b 0.41 and 0.34 GB/s, md5 0.40, sha512 0.37, sha3_256 0.23 GB/s cached; reading alone
8.4 and 1.7 GB/s. At load average 5 sha256 fell to 0.25-0.63 GB/s and blake2b to 0.18-0.27. Extrapolated to the
17 GB of FP16 shards of the full-scale checkpoint: 17-31 s with sha256 (up to ~70 s on a busy machine), 41-50 s
with blake2b. Hence sha256, paid at build time (the manifest) and then once more at most, not on every load:
once a shard matches, `.xcomp-lab-verified.json` records its size, mtime_ns, ctime_ns and inode, and it is hashed
again only when one of those changes. Any write to the file changes mtime and ctime, and a user process cannot set
ctime back (os.utime sets it to now), so a shard rewritten since its check is always hashed again; bit rot below
the file system is not caught after the first check. A shard changed less than `RACY_NS` before its check is not
stamped (a later write in the same timestamp tick could go unseen, git's "racily clean" rule), and a folder that
cannot be written to is hashed on every load.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import time
from pathlib import Path
from typing import Any

MANIFEST_NAME = "xcomp-lab-manifest.json"
STAMP_NAME = ".xcomp-lab-verified.json"
ALGORITHM = "sha256"
RACY_NS = 2_000_000_000
REDOWNLOAD = (
    "The checkpoint has no xcomp-lab manifest (it was downloaded or saved elsewhere, or built by an older xcomp_lab): "
    "download, copy or build it again (for a Hub download, delete its folder under ~/.cache/huggingface/hub and "
    "load it again)."
)


class DamagedCheckpointError(OSError):
    """A checkpoint shard is missing, truncated or does not match its checksum."""


def _shard_names(directory: Path) -> list[str]:
    """The safetensors shards in `directory`, sorted."""
    return sorted(path.name for path in directory.glob("*.safetensors"))


def file_digest(path: Path, algorithm: str = ALGORITHM) -> str:
    """The hex digest of the file at `path`, read in chunks."""
    with open(path, "rb", buffering=0) as handle:
        return hashlib.file_digest(handle, algorithm).hexdigest()


def write_manifest(directory: Path, rebuild: str) -> None:
    """Hash every shard in `directory` and write its manifest; `rebuild` says how to make the checkpoint again.

    The shards just hashed are stamped as verified too (see the module docstring), so the first load does not hash
    them again unless they were written within the last `RACY_NS`.
    """
    shards: dict[str, dict[str, Any]] = {}
    stamps: dict[str, dict[str, Any]] = {}
    for name in _shard_names(directory):
        path = directory / name
        before = path.stat()
        digest = file_digest(path)
        shards[name] = {"size": before.st_size, "digest": digest}
        if _stampable(before, path.stat()):
            stamps[name] = {"digest": digest, "stat": _stat_key(before)}
    manifest = {"algorithm": ALGORITHM, "rebuild": rebuild, "shards": shards}
    (directory / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
    if stamps:
        _write_stamps(directory, stamps)


def has_manifest(directory: Path) -> bool:
    """Whether `directory` carries a course manifest."""
    return (directory / MANIFEST_NAME).is_file()


def verify_checkpoint(directory: str | os.PathLike) -> None:
    """Check the shards of the local checkpoint `directory`; raise DamagedCheckpointError naming the first bad one.

    Every shard's header is checked against its size. Shards listed in a manifest are also checked against their
    size and checksum, unless a stamp shows they have not changed since they last matched.
    """
    directory = Path(directory)
    manifest = _read_manifest(directory)
    listed: dict[str, dict[str, Any]] = manifest["shards"] if manifest else {}
    fix = manifest["rebuild"] if manifest else REDOWNLOAD
    for name in _shard_names(directory):
        if name not in listed:
            _check_header(directory / name, fix)
    stamps = _read_stamps(directory)
    verified: dict[str, dict[str, Any]] = {}
    for name, expected in listed.items():
        path = directory / name
        if not path.is_file():
            raise DamagedCheckpointError(f"Checkpoint shard {path} is missing; its manifest lists it. {fix}")
        before = path.stat()
        if before.st_size != expected["size"]:
            raise DamagedCheckpointError(
                f"Checkpoint shard {path} is damaged: it holds {before.st_size} bytes, its manifest says "
                f"{expected['size']} (truncated, emptied or replaced). {fix}"
            )
        _check_header(path, fix)
        stamp = {"digest": expected["digest"], "stat": _stat_key(before)}
        if stamps.get(name) == stamp:
            verified[name] = stamp
            continue
        if file_digest(path, manifest["algorithm"]) != expected["digest"]:
            raise DamagedCheckpointError(
                f"Checkpoint shard {path} is damaged: its {manifest['algorithm']} checksum differs from the one "
                f"recorded when it was built (same size, so bytes inside it were overwritten). {fix}"
            )
        if _stampable(before, path.stat()):
            verified[name] = stamp
    if verified and verified != {name: stamps.get(name) for name in verified}:
        _write_stamps(directory, verified)


def _read_manifest(directory: Path) -> dict[str, Any] | None:
    path = directory / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
        if isinstance(manifest["rebuild"], str) and isinstance(manifest["shards"], dict) and manifest["algorithm"]:
            return manifest
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        pass
    raise DamagedCheckpointError(
        f"The manifest {path} is unreadable, so its shards cannot be checked. Delete the folder {directory} and "
        "build the checkpoint again."
    )


def _check_header(path: Path, fix: str) -> None:
    problem = _header_problem(path)
    if problem is not None:
        raise DamagedCheckpointError(f"Checkpoint shard {path} is damaged: {problem}. {fix}")


def _header_problem(path: Path) -> str | None:
    """What is wrong with the safetensors layout of `path` (8-byte header length, JSON header, data), or None."""
    size = path.stat().st_size
    if size == 0:
        return "it is empty (0 bytes)"
    with open(path, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little") if size >= 8 else None
        if length is None or length > size - 8:
            return f"it holds {size} bytes, too few for its safetensors header (truncated)"
        raw = handle.read(length)
    try:
        header = json.loads(raw)
        end = max((int(entry["data_offsets"][1]) for key, entry in header.items() if key != "__metadata__"), default=0)
    except (ValueError, AttributeError, KeyError, IndexError, TypeError):  # JSONDecodeError is a ValueError
        return "its safetensors header is not valid JSON describing tensors"
    expected = 8 + length + end
    if expected > size:
        return f"it holds {size} bytes but its header describes {expected} (truncated)"
    if expected < size:
        return f"it holds {size} bytes but its header describes only {expected} (bytes appended)"
    return None


def _stat_key(stat: os.stat_result) -> list[int]:
    return [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino]


def _stampable(before: os.stat_result, after: os.stat_result) -> bool:
    """Unchanged while it was hashed, and last changed long enough ago that a later change shows in its times."""
    changed = max(after.st_mtime_ns, after.st_ctime_ns)
    return _stat_key(before) == _stat_key(after) and time.time_ns() - changed >= RACY_NS


def _read_stamps(directory: Path) -> dict[str, Any]:
    try:
        stamps = json.loads((directory / STAMP_NAME).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return stamps if isinstance(stamps, dict) else {}


def _write_stamps(directory: Path, stamps: dict[str, Any]) -> None:
    """Replace the stamp file atomically; a folder that cannot be written to just keeps hashing on each load."""
    temporary = directory / f"{STAMP_NAME}.{os.getpid()}-{secrets.token_hex(4)}.tmp"
    try:
        temporary.write_text(json.dumps(stamps, indent=1))
        os.replace(temporary, directory / STAMP_NAME)
    except OSError:
        temporary.unlink(missing_ok=True)
