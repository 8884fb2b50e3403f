"""Agreement with human scores and effects of steering, from the result rows (pure functions, no model).

- :func:`qwk`: sklearn's ``cohen_kappa_score(weights="quadratic", labels=<the set's full range>)``; NaN when
  undefined (fewer than two items, or both raters constant on the same score) instead of a made-up 0 or 1.
- :func:`agreement`: QWK, bias (grader - human, raw expected score), MAE, exact and within-1 agreement
  (rounded score), Pearson r (raw), over the items that have a grade; missing grades are counted, not scored.
- :func:`student_effects`: per grader and student type, the mean normalised score (0-1 within each set's
  range) and its difference from the unsteered student under the same grader, with a paired bootstrap CI
  over (set, sample) items answered by both.
- :func:`grader_shifts`: per grader, bias and pooled QWK and their change vs the unsteered grader, with a
  paired bootstrap CI over the real answers both graded.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd

UNSTEERED = "unsteered"


def qwk(human: Sequence[int], predicted: Sequence[int], labels: Sequence[int]) -> float:
    """Quadratic weighted kappa over the full label range; NaN when undefined."""
    from sklearn.metrics import cohen_kappa_score

    human, predicted = list(human), list(predicted)
    if len(human) < 2:
        return math.nan
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        warnings.simplefilter("ignore")  # sklearn warns on the undefined case (0/0); NaN says it
        value = cohen_kappa_score(human, predicted, weights="quadratic", labels=list(labels))
    return float(value)


def qwk_replicates(
    human: Sequence[int], predicted: Sequence[int], labels: Sequence[int], indices: np.ndarray
) -> np.ndarray:
    """QWK of many resamples at once: ``indices [replicates, n]`` -> ``[replicates]`` (NaN where undefined).

    The same statistic as :func:`qwk` (a test checks them equal), vectorised: sklearn validates its inputs
    on every call (~5 ms), which made a 1,000-replicate bootstrap take minutes. With weights (i - j)^2,
    kappa = 1 - sum_items w[h, p] / (sum_ij w_ij * r_i * c_j / n), r and c the two raters' label counts.
    """
    labels = list(labels)
    position = {label: i for i, label in enumerate(labels)}
    h = np.array([position[v] for v in human], dtype=int)[indices]  # [replicates, n]
    p = np.array([position[v] for v in predicted], dtype=int)[indices]
    k = len(labels)
    weights = (np.arange(k)[:, None] - np.arange(k)[None, :]) ** 2.0  # [k, k]
    observed = weights[h, p].sum(axis=1)  # [replicates]
    rows = np.arange(len(indices))[:, None]
    counts_h = np.zeros((len(indices), k))
    counts_p = np.zeros((len(indices), k))
    np.add.at(counts_h, (rows, h), 1)
    np.add.at(counts_p, (rows, p), 1)
    expected = np.einsum("bi,ij,bj->b", counts_h, weights, counts_p) / indices.shape[1]
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(expected > 0, 1.0 - observed / expected, np.nan)


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) < 2 or np.std(x) == 0 or np.std(y) == 0:
        return math.nan
    return float(np.corrcoef(x, y)[0, 1])


def round_half_up(values) -> np.ndarray:
    return np.floor(np.asarray(values, dtype=float) + 0.5).astype(int)


def agreement(frame: pd.DataFrame, labels: Sequence[int]) -> dict:
    """Metrics of one grader against humans on rows with columns human, expected, score (NaN = missing)."""
    graded = frame[frame["expected"].notna()]
    human = graded["human"].to_numpy(float)
    expected = graded["expected"].to_numpy(float)
    score = graded["score"].to_numpy(float)
    n = len(graded)
    return {
        "n": n,
        "missing": int(len(frame) - n),
        "qwk": qwk(round_half_up(human), score.astype(int), labels) if n else math.nan,
        "bias": float(np.mean(expected - human)) if n else math.nan,
        "mae": float(np.mean(np.abs(score - human))) if n else math.nan,
        "exact": float(np.mean(score == round_half_up(human))) if n else math.nan,
        "within1": float(np.mean(np.abs(score - human) <= 1)) if n else math.nan,
        "pearson_r": pearson(expected, human),
    }


def bootstrap_ci(
    values_or_items, statistic: Callable[[np.ndarray], float], n_boot: int, seed: int, level: float = 0.95
) -> tuple[float, float]:
    """Percentile CI of ``statistic`` over resamples (with replacement) of the items' indices."""
    n = len(values_or_items)
    if n < 2 or n_boot < 1:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    return percentile_ci(
        np.array([statistic(rng.integers(0, n, n)) for _ in range(n_boot)], dtype=float), level
    )


def percentile_ci(replicates: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the finite bootstrap replicates (NaN, NaN when there are none)."""
    replicates = replicates[np.isfinite(replicates)]
    if not len(replicates):
        return math.nan, math.nan
    alpha = (1 - level) / 2
    return float(np.quantile(replicates, alpha)), float(np.quantile(replicates, 1 - alpha))


def with_normalised(frame: pd.DataFrame, sets: dict) -> pd.DataFrame:
    """Add ``normalised`` = (expected - min) / (max - min) of each row's set."""
    frame = frame.copy()
    low = frame["set"].map(lambda s: sets[int(s)].min_score).astype(float)
    high = frame["set"].map(lambda s: sets[int(s)].max_score).astype(float)
    frame["normalised"] = (frame["expected"].astype(float) - low) / (high - low)
    return frame


def student_effects(grades: pd.DataFrame, sets: dict, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Experiment A rows (type, grader, set, sample, expected) -> one row per (grader, type)."""
    if grades.empty:
        return pd.DataFrame(
            columns=[
                "grader",
                "type",
                "n",
                "missing",
                "mean_normalised",
                "effect",
                "ci_low",
                "ci_high",
                "n_paired",
            ]
        )
    frame = with_normalised(grades, sets)
    out = []
    for grader, by_grader in frame.groupby("grader", sort=False):
        base = by_grader[by_grader["type"] == UNSTEERED].set_index(["set", "sample"])["normalised"].dropna()
        for student, rows in by_grader.groupby("type", sort=False):
            values = rows.set_index(["set", "sample"])["normalised"]
            present = values.dropna()
            row = {
                "grader": grader,
                "type": student,
                "n": len(present),
                "missing": int(values.isna().sum()),
                "mean_normalised": float(present.mean()) if len(present) else math.nan,
            }
            common = present.index.intersection(base.index)
            diffs = (present.loc[common] - base.loc[common]).to_numpy(float)
            if student == UNSTEERED:
                row.update(effect=0.0, ci_low=math.nan, ci_high=math.nan, n_paired=len(common))
            elif len(diffs):
                low, high = bootstrap_ci(diffs, lambda idx, d=diffs: float(d[idx].mean()), n_boot, seed)
                row.update(effect=float(diffs.mean()), ci_low=low, ci_high=high, n_paired=len(diffs))
            else:
                row.update(effect=math.nan, ci_low=math.nan, ci_high=math.nan, n_paired=0)
            out.append(row)
    return pd.DataFrame(out)


def grader_metrics(grades: pd.DataFrame, sets: dict) -> pd.DataFrame:
    """Experiment B rows (grader, set, human, expected, score) -> per grader: every set and ``pooled``.

    Pooled QWK uses the union of the sets' ranges (0-3) on the raw scales; ``mean_set_qwk`` on the pooled row
    is the mean of the defined per-set values (the usual ASAP-SAS summary).
    """
    rows = []
    for grader, by_grader in grades.groupby("grader", sort=False):
        per_set = []
        for set_id, part in by_grader.groupby("set", sort=True):
            metrics = agreement(part, sets[int(set_id)].labels)
            per_set.append(metrics["qwk"])
            rows.append({"grader": grader, "set": str(int(set_id)), **metrics})
        low = min(sets[int(s)].min_score for s in by_grader["set"].unique())
        high = max(sets[int(s)].max_score for s in by_grader["set"].unique())
        pooled = agreement(by_grader, list(range(low, high + 1)))
        defined = [q for q in per_set if math.isfinite(q)]
        rows.append(
            {
                "grader": grader,
                "set": "pooled",
                **pooled,
                "mean_set_qwk": float(np.mean(defined)) if defined else math.nan,
            }
        )
    return pd.DataFrame(rows)


def grader_shifts(grades: pd.DataFrame, sets: dict, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Per grader: bias and pooled QWK, and their change vs the unsteered grader (paired bootstrap CIs)."""
    columns = [
        "grader",
        "n_paired",
        "bias",
        "delta_bias",
        "delta_bias_ci_low",
        "delta_bias_ci_high",
        "qwk",
        "delta_qwk",
        "delta_qwk_ci_low",
        "delta_qwk_ci_high",
    ]
    if grades.empty or UNSTEERED not in set(grades["grader"]):
        return pd.DataFrame(columns=columns)
    present = [sets[int(s)] for s in grades["set"].unique()]
    labels = list(
        range(min(s.min_score for s in present), max(s.max_score for s in present) + 1)
    )  # as pooled
    graded = grades[grades["expected"].notna()]
    base = graded[graded["grader"] == UNSTEERED].set_index(["set", "sample"])
    out = []
    for grader, rows in graded.groupby("grader", sort=False):
        rows = rows.set_index(["set", "sample"])
        common = rows.index.intersection(base.index)
        mine, ref = rows.loc[common], base.loc[common]
        human = round_half_up(ref["human"].to_numpy(float))
        bias_mine = mine["expected"].to_numpy(float) - ref["human"].to_numpy(float)
        bias_ref = ref["expected"].to_numpy(float) - ref["human"].to_numpy(float)
        score_mine, score_ref = mine["score"].to_numpy(int), ref["score"].to_numpy(int)

        n = len(common)
        dq = qwk(human, score_mine, labels) - qwk(human, score_ref, labels) if n else math.nan
        db = float(np.mean(bias_mine - bias_ref)) if n else math.nan
        gap = bias_mine - bias_ref
        db_ci = bootstrap_ci(gap, lambda idx, gap=gap: float(np.mean(gap[idx])), n_boot, seed)
        dq_ci = (math.nan, math.nan)
        if n >= 2 and n_boot >= 1:
            indices = np.random.default_rng(seed).integers(0, n, (n_boot, n))
            replicates = qwk_replicates(human, score_mine, labels, indices) - qwk_replicates(
                human, score_ref, labels, indices
            )
            dq_ci = percentile_ci(replicates)
        out.append(
            {
                "grader": grader,
                "n_paired": n,
                "bias": float(np.mean(bias_mine)) if n else math.nan,
                "delta_bias": db,
                "delta_bias_ci_low": db_ci[0],
                "delta_bias_ci_high": db_ci[1],
                "qwk": qwk(human, score_mine, labels) if n else math.nan,
                "delta_qwk": dq,
                "delta_qwk_ci_low": dq_ci[0],
                "delta_qwk_ci_high": dq_ci[1],
            }
        )
    return pd.DataFrame(out, columns=columns)
