"""Calibration on a real model: probes and error per layer, and does the dose transfer across layers?

For one vector (default: the shipped evil vector of the embedded model, copied so its sidecar stays as shipped),
`persona calibrate` at several layers; prints every layer's probes, the final error against the coherence target,
and the coefficient of variation (std / mean) over layers of the calibrated dose and of the calibrated raw coef —
the unit that varies less transfers better. Probes are cached in --output_dir: a re-run prints without probing.

    python bench/calibrate.py --layers 8,11,14,17,20 --max_questions 4 --max_tokens 24 --max_pairs 6
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time
from pathlib import Path

import common  # noqa: F401  (offline, quiet)
import pandas as pd

SHIPPED = (
    Path(__file__).resolve().parents[1] / "persona_vectors" / "smollm2-135m" / "evil_response_avg_diff.pt"
)


def coefficient_of_variation(values) -> float:
    values = [abs(v) for v in values]
    return statistics.pstdev(values) / statistics.mean(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vector_path", default=str(SHIPPED))
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layers", default="8,11,14,17,20")
    parser.add_argument("--target", type=float, default=80.0)
    parser.add_argument("--max_probes", type=int, default=8)
    parser.add_argument("--max_questions", type=int, default=4)
    parser.add_argument("--max_tokens", type=int, default=24)
    parser.add_argument("--max_pairs", type=int, default=6)
    parser.add_argument("--output_dir", default="runs/bench/calibrate")
    args = parser.parse_args()

    from persona.commands.calibrate import calibrate

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    vector = out / Path(args.vector_path).name
    if not vector.exists():  # a copy: the recommendation goes into the copy's sidecar
        for suffix in (".pt", ".json"):
            source = Path(args.vector_path).with_suffix(suffix)
            if source.exists():
                shutil.copy(source, vector.with_suffix(suffix))
    start = time.perf_counter()
    calibrate(
        str(vector), model=args.model, layers=[int(x) for x in args.layers.split(",")], target=args.target,
        max_probes=args.max_probes, max_questions=args.max_questions, max_tokens=args.max_tokens,
        max_pairs=args.max_pairs, output_dir=str(out / "calibration"),
    )  # fmt: skip
    wall = time.perf_counter() - start
    probes = pd.read_csv(out / "calibration" / "probes.csv")
    per_layer = pd.read_csv(out / "calibration" / "calibration.csv")
    print(f"\nwall {wall:.1f} s (cached probes are not re-run)")
    for layer, rows in probes.groupby("layer"):
        trail = ", ".join(f"{d:.3f}->{c:.1f}" for d, c in zip(rows["dose"], rows["coherence"], strict=True))
        row = per_layer.set_index("layer").loc[layer]
        print(f"layer {layer}: {len(rows)} probes (dose->coherence: {trail}); error {row['error']:+.2f} "
              f"({'within' if row['reached'] else 'NOT within'} ±3)")  # fmt: skip
    reached = per_layer[per_layer["reached"]]
    print(f"\nover the {len(reached)} layers that reached the target:")
    print(
        f"  calibrated dose: {', '.join(f'{d:.3f}' for d in reached['dose'])}  CV {coefficient_of_variation(reached['dose']):.3f}"
    )
    print(f"  calibrated coef: {', '.join(f'{c:.3f}' for c in reached['coef'])}  CV {coefficient_of_variation(reached['coef']):.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
