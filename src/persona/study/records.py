"""Run directories made of cached phases, and the markdown report that ties their CSVs and PNGs together.

A phase's results are stored in ``<run_dir>/<phase>/phase.json`` with a key made from its inputs;
re-running with the same inputs reuses the phase instead of recomputing it (so interrupted runs
resume where they stopped).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from persona.core.store import read_json, write_json


def inputs_key(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class PhaseRunner:
    """Runs named phases in order, each at most once per set of inputs; prints progress with timings.

    A phase whose science gives no result (:class:`~persona.core.errors.MissedResult`: no pair kept, no score) is
    recorded as missed with its reason, cached like a result, and the run goes on; ``missed`` lists them.
    """

    run_dir: Path
    total: int
    device: str | None = None  # where the phases run, kept in each phase record
    done: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    devices: dict[str, str] = field(default_factory=dict)
    missed: dict[str, str] = field(default_factory=dict)

    def run(self, name: str, inputs: dict, compute: Callable[[Path], dict]) -> dict | None:
        """The phase's results (None when it missed)."""
        from persona.core.errors import MissedResult

        self.done += 1
        phase_dir = self.run_dir / name
        record_path = phase_dir / "phase.json"
        key = inputs_key(inputs)
        if record_path.is_file():
            record = read_json(record_path, what="phase record")
            if record.get("key") == key:
                print(
                    f"[{self.done}/{self.total}] {name}: reused (finished earlier in {record['seconds']:.1f} s)"
                    + (f"; missed: {record['missed']}" if record.get("missed") else "")
                )
                self.timings[f"{name} (reused)"] = record["seconds"]
                self.devices[f"{name} (reused)"] = record.get("device") or ""
                if record.get("missed"):
                    self.missed[name] = record["missed"]
                return record["results"]
        print(f"[{self.done}/{self.total}] {name} ...", flush=True)
        phase_dir.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        try:
            results, missed = compute(phase_dir), None
        except MissedResult as error:
            results, missed = None, " ".join(str(error).split())
        seconds = time.perf_counter() - start
        record = {"key": key, "inputs": inputs, "seconds": seconds, "device": self.device, "results": results}
        if missed:
            record["missed"] = self.missed[name] = missed
        write_json(record_path, record)
        self.timings[name] = seconds
        self.devices[name] = self.device or ""
        outcome = f"missed: {missed}" if missed else "done"
        print(f"[{self.done}/{self.total}] {name}: {outcome} in {seconds:.1f} s", flush=True)
        return results

    def skip(self, name: str, reason: str) -> None:
        """A phase that can't run because what it needs was missed earlier: counted and recorded, not run."""
        self.done += 1
        self.missed[name] = reason
        print(f"[{self.done}/{self.total}] {name}: missed: {reason}", flush=True)


def relative(path: str | Path, run_dir: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(run_dir.resolve()))
    except ValueError:
        return str(path)


def markdown_table(frame: pd.DataFrame, *, floatfmt: str = ".3f") -> str:
    return frame.to_markdown(index=False, floatfmt=floatfmt)  # pandas + tabulate
