"""Atomic outputs: a stage writes into a temp sibling and renames it into place, so an interrupted run never
leaves a half-written output behind for DVC to cache.

Temp siblings are named `.<name>.<pid>@<host>.<random>.tmp`: a run that was SIGKILLed cannot clean up after itself,
so every atomic writer first removes the leftovers of its own path whose owner is provably gone (same host, pid no
longer alive). A live writer of the same path (another process, or another thread of this one) is never touched.
Outputs get the modes a plain mkdir/open would give (0777/0666 minus the umask), not mkdtemp's private 0700/0600,
so a colleague or a serving process under another user can read the student.

Also the content keys that name caches and runs by their inputs' bytes (the screen's cache, the distillation run
dir): `digest_paths`, `hash_files`, `hash_parquet_footer`."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "host"


def _umask() -> int:
    """The process umask, read without changing it where Linux exposes it (os.umask can only set-and-return)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.{os.getpid()}@{_HOST}."


def _old_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}@{_HOST}.old")


def remove_stale_temps(path: str | Path) -> list[Path]:
    """Delete `path`'s temp siblings left by dead processes of this host; returns what was removed.

    A run killed between atomic_dir's two renames leaves the previous output as `.<name>.<pid>@<host>.old` and no
    `path`: that one is put back in place (it is the only copy), or removed if `path` was written since."""
    path = Path(path)
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(\d+)@{re.escape(_HOST)}\.(?:[A-Za-z0-9_]+\.tmp|old)")
    removed = []
    with contextlib.suppress(FileNotFoundError):
        for entry in sorted(path.parent.iterdir()):
            m = pattern.fullmatch(entry.name)
            if m is None or _pid_alive(int(m.group(1))):
                continue
            if entry.name.endswith(".old") and not os.path.lexists(path):
                os.replace(entry, path)
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty temp dir beside `path`; on success it replaces `path` in one rename, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    try:
        if os.path.lexists(path):
            old = _old_name(path)
            os.replace(path, old)
        os.replace(tmp, path)
    except BaseException:  # the previous output goes back in place: a failed rename must not lose it
        if old is not None and not os.path.lexists(path):
            os.replace(old, path)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "w") -> Iterator[Any]:
    """Open a temp file beside `path` for writing; it replaces `path` only if the block finishes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as fh:
            os.fchmod(fh.fileno(), 0o666 & ~_umask())
            yield fh
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: str | Path, obj: Any) -> None:
    """Deterministic JSON (sorted keys, fixed indent, trailing newline) so DVC hashes only real changes."""
    with atomic_file(path) as fh:
        json.dump(obj, fh, indent=2, sort_keys=True)
        fh.write("\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


TIMINGS_DIR = Path("timings")


def write_timings(stage: str, obj: dict[str, Any], root: str | Path = ".") -> Path:
    """Wall-clock figures of a stage run (seconds, tokens/s) go to timings/<stage>.json, which is neither a DVC
    output nor tracked by git: DVC-tracked outputs and metrics must be byte-identical for the same params and
    inputs, and a speed never is."""
    path = Path(root) / TIMINGS_DIR / f"{stage}.json"
    write_json(path, obj)
    return path


# ---------------------------------------------------------------------------------------------------- content keys
def hash_files(h, files: Iterable[Path], label: Callable[[Path], str]) -> None:
    """Feed each of `files`, in the order given, to the hashlib object `h`: label(file) encoded, then its bytes."""
    for path in files:
        h.update(label(path).encode())
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 24):
                h.update(chunk)


def hash_parquet_footer(h, path: Path) -> None:
    """Feed `path`'s size and Parquet footer (schema, row counts, per-chunk sizes and statistics) to `h`: identical
    for an identically rebuilt file whatever its mtime, without reading the data pages."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        fh.seek(size - 8)
        footer_len = int.from_bytes(fh.read(4), "little")
        fh.seek(size - 8 - footer_len)
        h.update(f"{size}:".encode() + fh.read(footer_len))


def digest_paths(paths: Iterable[str | Path]) -> str:
    """sha256 over the names, sizes and bytes of every file under `paths` (sorted): the inputs' content key."""
    h = hashlib.sha256()
    for root in map(Path, paths):
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        hash_files(h, files, lambda f, root=root: f"{f.relative_to(root.parent)}:{f.stat().st_size}\n")
    return h.hexdigest()
