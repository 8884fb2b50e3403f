"""Files that are never half-written, and keyed journals that let a killed run resume.

- :func:`atomic_write` writes a temporary file beside the target and renames it into place; the result
  gets the mode a plain ``open(..., "w")`` would give (umask), or keeps the mode of the file it replaces.
- :class:`KeyedJournal` is an append-only JSONL file of rows with a key. Each append is one write of
  whole lines, flushed and fsynced, so a crash leaves at most a torn last line. One rule for damage: a
  line that does not parse (torn or garbled, anywhere) is named with its file and line number and moved
  to ``<journal>.damaged``; every intact row before and after it is kept. The first row of a key wins,
  and callers skip keys already present, so a resumed run neither loses nor duplicates rows.
- :func:`check_signature` keeps the settings of a run beside its results, so a re-run with other
  settings is refused instead of mixing rows.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

log = logging.getLogger(__name__)


def _default_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp_path)``, then rename it to ``path``: readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = stat.S_IMODE(path.stat().st_mode) if path.exists() else _default_mode()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: str | Path, data) -> Path:
    return write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def write_jsonl(path: str | Path, records) -> Path:
    """One compact JSON object a line (UTF-8, non-ASCII kept as is), each line ending in a newline."""
    return write_text(path, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))


def read_json(path: str | Path, *, what: str = "file") -> dict:
    """A JSON object from ``path``; a clear error naming the file when it is missing, truncated or not an object."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such {what}. Fix: check the path.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(
            f"{path}: not valid JSON ({error}). Fix: restore or regenerate this {what}."
        ) from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(data).__name__}. Fix: regenerate it.")
    return data


def read_journal(path: str | Path) -> tuple[list[dict], list[tuple[int, bytes]]]:
    """(intact rows in file order, damaged lines as (line number, bytes)). A missing file is empty."""
    path = Path(path)
    if not path.is_file():
        return [], []
    rows, damaged = [], []
    for number, line in enumerate(path.read_bytes().splitlines(keepends=True), start=1):
        try:
            row = json.loads(line.decode("utf-8")) if line.endswith(b"\n") else None
        except (UnicodeDecodeError, json.JSONDecodeError):
            row = None
        if isinstance(row, dict):
            rows.append(row)
        elif line.strip():
            damaged.append((number, line))
    return rows, damaged


class KeyedJournal:
    """An append-only JSONL file of rows keyed by ``key_fields`` (see the module docstring)."""

    def __init__(
        self, path: str | Path, key_fields: Sequence[str], *, damaged_path: str | Path | None = None
    ):
        self.path = Path(path)
        self.key_fields = tuple(key_fields)
        self.damaged_path = (
            Path(damaged_path) if damaged_path else self.path.with_name(self.path.name + ".damaged")
        )
        self._repaired = False

    def key(self, row: dict) -> tuple:
        return tuple(row[f] for f in self.key_fields)

    def rows(self) -> list[dict]:
        rows, damaged = read_journal(self.path)
        for number, _ in damaged:
            log.warning(
                "%s:%d: damaged line (an interrupted write?) skipped; it is moved to %s on the next append",
                self.path,
                number,
                self.damaged_path.name,
            )
        return rows

    def load(self) -> dict[tuple, dict]:
        keyed: dict[tuple, dict] = {}
        for row in self.rows():
            keyed.setdefault(self.key(row), row)
        return keyed

    def keys(self) -> set[tuple]:
        return set(self.load())

    def _repair(self) -> None:
        """Move damaged lines aside (so the next row is not glued onto a torn one) and keep every intact row."""
        if self._repaired:
            return
        self._repaired = True
        rows, damaged = read_journal(self.path)
        if not damaged:
            return
        with self.damaged_path.open("ab") as aside:
            for number, line in damaged:
                aside.write(f"# {self.path.name}:{number}\n".encode() + line.rstrip(b"\n") + b"\n")
        write_text(self.path, "".join(_json_line(row) for row in rows))
        log.warning("%s: %d damaged line(s) moved to %s", self.path, len(damaged), self.damaged_path)

    def append(self, rows: Iterable[dict]) -> int:
        rows = list(rows)
        if not rows:
            return 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._repair()
        with self.path.open("ab") as handle:
            handle.write("".join(_json_line(row) for row in rows).encode("utf-8"))
            handle.flush()
            os.fsync(handle.fileno())
        return len(rows)


def _json_line(row: dict) -> str:
    return json.dumps(row, ensure_ascii=False, default=float) + "\n"


def check_signature(
    meta_path: str | Path,
    signature: dict,
    *,
    command: str,
    subject: str | Path,
    fix: str,
    owned: Iterable[Path] = (),
) -> None:
    """Write ``meta_path`` for a fresh run; refuse to continue one made with other settings.

    ``subject`` names the output in messages; ``fix`` is the advice for a clash, e.g. "choose another
    --run_dir, or pass --overwrite true to start over"; ``owned``: outputs that must not exist without a
    meta file (a file of that name that someone else wrote).
    """
    meta_path = Path(meta_path)
    if meta_path.is_file():
        stored = read_json(meta_path, what="run metadata file").get("signature", {})
        differ = [
            f"{k}: {stored.get(k)!r} there, {signature.get(k)!r} now"
            for k in sorted(set(stored) | set(signature))
            if stored.get(k) != signature.get(k)
        ]
        if differ:
            raise ValueError(
                f"{subject} holds results made with other settings ({'; '.join(differ)}). Fix: repeat the "
                f"original command to resume it, {fix}."
            )
        return
    clashing = [str(p) for p in owned if Path(p).exists()]
    if clashing:
        raise ValueError(
            f"{clashing[0]} exists but was not written by `{command}` (no {meta_path.name}). Fix: {fix}."
        )
    from persona import __version__

    write_json(meta_path, {"command": command, "persona_version": __version__, "signature": signature})


def write_csv(path: str | Path, frame) -> Path:
    """A pandas DataFrame as CSV (no index), atomically."""
    return atomic_write(path, lambda tmp: frame.to_csv(tmp, index=False))


def write_figure(path: str | Path, figure, *, dpi: int = 120, **savefig) -> Path:
    """A matplotlib figure as PNG, atomically (the figure stays open; the caller closes it)."""
    return atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=dpi, **savefig))


def batch_seed(seed: int, *parts) -> int:
    """A seed from the base seed and a batch's keys only, so a resumed batch samples exactly as the first time."""
    text = "|".join(map(str, (seed, *parts)))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & (2**63 - 1)


def sidecar_path(path: str | Path) -> Path:
    return Path(path).with_suffix(".json")


def checkout_root() -> Path:
    """The directory holding ``src/`` of the checkout persona runs from: where the shipped ``datasets/`` and
    ``persona_vectors/`` live (an installed wheel has none there; callers fall back to the working directory)."""
    return Path(__file__).resolve().parents[3]
