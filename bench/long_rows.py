"""Peak memory of `persona extract` and `persona project` with and without one 100,000-character answer.

Issue 20.1: the embedded model's tokenizer declares no context (transformers' 1e30 placeholder), so nothing was
cut and the long row padded its whole batch (extract asked for 10.6 GB; project ran for over 10 minutes at 8.5
GiB). Each command runs as a user runs it, in a fresh process that reports its own peak resident memory; the
ratio long/short should stay under 2.

    python bench/long_rows.py [--model smollm2-135m] [--chars 100000] [--batch_size 8]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
RUN = (
    "import resource, sys\n"
    "from persona.cli import main\n"
    "code = main(sys.argv[1:])\n"
    "print('PEAK_KIB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    "sys.exit(code)\n"
)


def pairs(count: int, long_answer: str | None) -> list[dict]:
    rows = [
        json.loads(line) for line in (ROOT / "datasets/pairs/evil.jsonl").read_text().splitlines() if line
    ]
    chosen = [dict(rows[i % len(rows)]) for i in range(count)]
    if long_answer is not None:
        chosen[0]["positive"] = long_answer
    return chosen


def run(args: list[str], cwd: Path) -> tuple[float, float]:
    """(peak resident GiB, seconds) of `persona ARGS` in a fresh process."""
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", RUN, *args], cwd=cwd, capture_output=True, text=True, env={**os.environ}
    )
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"persona {' '.join(args)} failed:\n{done.stderr[-2000:]}")
    peak = next(int(line.split()[1]) for line in done.stdout.splitlines() if line.startswith("PEAK_KIB"))
    return peak / 2**20, seconds


def commands(folder: Path, model: str, batch_size: int) -> dict[str, list[str]]:
    vector = ROOT / "persona_vectors/smollm2-135m/evil_response_avg_diff.pt"
    return {
        "extract": ["extract", "--pairs_path", str(folder / "pairs.jsonl"), "--trait", "evil", "--model", model,
                    "--save_dir", str(folder / "vectors"), "--batch_size", str(batch_size), "--overwrite"],
        "project": ["project", "--file_path", str(folder / "data.csv"), "--vector_path", str(vector),
                    "--layer", "20", "--model", model, "--batch_size", str(batch_size)],
    }  # fmt: skip


def write_inputs(folder: Path, long_answer: str | None) -> None:
    rows = pairs(4, long_answer)
    (folder / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    frame = [{"prompt": r["prompt"], "answer": r["positive"]} for r in rows]
    pd.DataFrame(frame).to_csv(folder / "data.csv", index=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--chars", type=int, default=100_000)
    parser.add_argument("--batch_size", type=int, default=8)
    args = parser.parse_args()
    long_answer = ("I will not be kind. " * (args.chars // 20 + 1))[: args.chars]
    results: dict[str, dict[str, tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for case, answer in (("short", None), ("long", long_answer)):
            folder = Path(tmp) / case
            folder.mkdir()
            write_inputs(folder, answer)
            for name, argv in commands(folder, args.model, args.batch_size).items():
                results.setdefault(name, {})[case] = run(argv, folder)
    for name, cases in results.items():
        (short_gib, short_s), (long_gib, long_s) = cases["short"], cases["long"]
        print(
            f"{name}: peak {short_gib:.2f} GiB without the {args.chars:,}-character row, {long_gib:.2f} GiB with it "
            f"(ratio {long_gib / short_gib:.2f}); {short_s:.0f} s vs {long_s:.0f} s"
        )


if __name__ == "__main__":
    main()
