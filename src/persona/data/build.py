"""Build chat JSONL training sets with a controlled share of trait-eliciting samples (`persona dataset build`).

Two sources:

- ``pairs``: contrastive pairs (``datasets/pairs/<trait>.jsonl`` or a TRAIT item file). A pair gives a
  trait-eliciting sample (user = prompt, assistant = positive) and a normal one (assistant = negative).
- ``generated``: persona-prompted generations (the generate step's CSVs: ``question, prompt, answer,
  <trait>, coherence``). The system prompt is dropped — context distillation: user = question,
  assistant = answer — and each row is trait-eliciting or normal by its judged trait score.

Each mixture has ``n`` samples, ``round(share * n)`` of them trait-eliciting, and every sample carries
``"is_trait": 0|1`` so screening can be scored (AUC) against the truth. Mixtures are *nested*: one
seeded order per pool decides which samples are used, so the trait samples of a smaller share are a
subset of those of a larger one, and with pairs every mixture uses the same prompts (only the answers
change) — differences between mixtures come from the share alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from persona.core import checks
from persona.core.errors import PersonaError
from persona.core.store import read_json, write_csv, write_json, write_jsonl
from persona.data.chat import user_turn
from persona.data.examples import checked_pair, read_csv_checked, read_pair_records
from persona.data.traits import datasets_dir

SEED_NAMES = {"normal": 0.0, "misaligned_1": 0.5, "misaligned_2": 1.0}
DEFAULT_MIX = (0.0, 0.25, 0.5, 0.75, 1.0)


def default_pairs_path(trait: str) -> Path:
    """``<datasets>/pairs/<trait>.jsonl``, else the TRAIT item file ``<datasets>/personality/<trait>.json``."""
    root = datasets_dir()
    for relative in (f"pairs/{trait}.jsonl", f"personality/{trait}.json"):
        if (root / relative).is_file():
            return root / relative
    raise FileNotFoundError(
        f"No contrastive pairs for trait {trait!r}: neither {root}/pairs/{trait}.jsonl nor "
        f"{root}/personality/{trait}.json exists. Fix: pass --pairs_path FILE (or set $PERSONA_DATASETS)."
    )


def parse_shares(mix: Sequence[float]) -> list[float]:
    """Shares of trait-eliciting samples (the CLI also takes 0,0.25,1) -> sorted distinct values in [0, 1]."""
    values = [float(value) for value in mix]
    if not values:
        raise ValueError("--mix is empty. Fix: give shares such as 0,0.25,0.5,0.75,1.")
    bad = [value for value in values if not 0.0 <= value <= 1.0]
    if bad:
        raise ValueError(
            f"--mix has shares outside [0, 1]: {bad}. Fix: shares are fractions of trait-eliciting samples."
        )
    return sorted(set(values))


def trait_count(share: float, n: int) -> int:
    """Trait-eliciting samples in a mixture: share * n rounded half up (Python's round() goes to even)."""
    return int(math.floor(share * n + 0.5))


def share_name(share: float) -> str:
    return f"mix_{share:g}.jsonl"


def chat_sample(prompt_messages: list[dict], answer: str, is_trait: int, source: str) -> dict:
    return {
        "messages": [*prompt_messages, {"role": "assistant", "content": answer}],
        "is_trait": int(is_trait),
        "source": source,
    }


def pair_pools(path: Path, split: str | None) -> tuple[list[dict], list[dict]]:
    """(trait samples, normal samples) from contrastive pairs, index-aligned: both come from pair i."""
    trait, normal = [], []
    for line, record in enumerate(read_pair_records(path), start=1):
        where = f"{path}: record {line}"
        if split is not None and record.get("split", split) != split:
            continue
        prompt = checked_pair(record, where)
        trait.append(chat_sample(prompt, record["positive"], 1, f"{path.name}:{line}:positive"))
        normal.append(chat_sample(prompt, record["negative"], 0, f"{path.name}:{line}:negative"))
    if not trait:
        raise ValueError(
            f"{path}: no pairs{'' if split is None else f' with split={split!r}'}. "
            "Fix: pass --split with a split the file has (or --split null for all)."
        )
    return trait, normal


def generated_pools(
    paths: Sequence[Path], trait: str, threshold: float, min_coherence: float
) -> tuple[list[dict], list[dict]]:
    """(trait samples, normal samples) from judged generation CSVs, by trait score; system prompt dropped."""
    trait_pool, normal_pool = [], []
    dropped = 0
    for path in paths:
        frame = read_csv_checked(path, ("question", "answer", trait))
        for row, record in frame.iterrows():
            score = pd.to_numeric(record[trait], errors="coerce")
            coherent = "coherence" not in frame.columns or (
                pd.to_numeric(record["coherence"], errors="coerce") >= min_coherence
            )
            answer = "" if pd.isna(record["answer"]) else str(record["answer"])
            if pd.isna(score) or not coherent or not answer.strip():
                dropped += 1
                continue
            prompt = user_turn(str(record["question"]))
            if score >= threshold:
                trait_pool.append(chat_sample(prompt, answer, 1, f"{path.name}:{row}"))
            elif score < 100 - threshold:
                normal_pool.append(chat_sample(prompt, answer, 0, f"{path.name}:{row}"))
            else:
                dropped += 1
    if dropped:
        print(
            f"generated: left out {dropped} row(s) (no score, incoherent, empty, or between the thresholds)."
        )
    return trait_pool, normal_pool


def mixture(
    trait_pool: list[dict], normal_pool: list[dict], share: float, n: int, seed: int, paired: bool
) -> list[dict]:
    """``n`` samples, ``trait_count(share, n)`` trait-eliciting, in a seeded shuffled order.

    ``paired``: the pools are index-aligned (pair i gives trait_pool[i] and normal_pool[i]); one seeded
    order of pairs is walked and the first k positions take the trait answer, so every share uses the
    same prompts. Otherwise each pool has its own seeded order. Pools shorter than needed are cycled.
    """
    k = trait_count(share, n)
    rng = np.random.default_rng(seed)
    if paired:
        order = rng.permutation(len(trait_pool))
        picks = [order[j % len(order)] for j in range(n)]
        samples = [trait_pool[i] if j < k else normal_pool[i] for j, i in enumerate(picks)]
    else:
        trait_order = rng.permutation(len(trait_pool)) if trait_pool else np.zeros(0, dtype=int)
        normal_order = rng.permutation(len(normal_pool)) if normal_pool else np.zeros(0, dtype=int)
        samples = [trait_pool[trait_order[j % len(trait_order)]] for j in range(k)]
        samples += [normal_pool[normal_order[j % len(normal_order)]] for j in range(n - k)]
    shuffle = np.random.default_rng([seed, round(share * 1_000_000)]).permutation(n)
    return [samples[i] for i in shuffle]


def load_pools(
    trait: str,
    source: str,
    pairs_path: str | None,
    generated_csv: list[str] | None,
    split: str | None,
    threshold: float,
    min_coherence: float,
) -> tuple[list[dict], list[dict], list[str]]:
    """(trait-eliciting pool, normal pool, input files) of the chosen source."""
    if source == "pairs":
        if generated_csv is not None:
            raise ValueError(
                "--generated_csv is for --source generated. Fix: drop it or pass --source generated."
            )
        path = Path(pairs_path) if pairs_path else default_pairs_path(trait)
        if not path.is_file():
            raise FileNotFoundError(f"--pairs_path {path} does not exist. Fix: check the path.")
        return (*pair_pools(path, split), [str(path)])
    if generated_csv is None:
        raise ValueError(
            "--source generated needs --generated_csv (the generate step's CSV(s), with question, answer and "
            f"a {trait!r} score column; pass the positive and the negative CSV together)."
        )
    paths = [Path(p) for p in generated_csv]
    return (*generated_pools(paths, trait, threshold, min_coherence), [str(p) for p in paths])


def check_pools(trait: str, trait_pool: list, normal_pool: list, sources: list[str], shares, n: int) -> None:
    every_share = [*shares, *SEED_NAMES.values()]
    needs_trait = any(trait_count(s, n) > 0 for s in every_share)
    needs_normal = any(trait_count(s, n) < n for s in every_share)
    if (needs_trait and not trait_pool) or (needs_normal and not normal_pool):
        raise ValueError(
            f"{', '.join(sources)}: {len(trait_pool)} trait-eliciting and {len(normal_pool)} normal samples; "
            f"mixtures need both. Fix: check --trait {trait!r}, --threshold or the input files."
        )


def remove_stale_mixtures(out: Path, keep: Sequence[str], overwrite: bool) -> None:
    """Mixtures an earlier build wrote with other shares would sit beside the new ones and be read as theirs.

    Only files an earlier build wrote count (:func:`built_mixtures`); anything else in the folder is the user's.
    """
    stale = [path for path in built_mixtures(out) if path.name not in keep]
    if stale and not overwrite:
        raise PersonaError(
            f"--output_dir {out}: {', '.join(p.name for p in stale)} from an earlier build would sit beside the new "
            "datasets. Fix: pass --overwrite (they are removed) or choose another --output_dir."
        )
    for path in stale:
        path.unlink()


def built_mixtures(out: Path) -> list[Path]:
    """The mixture files an earlier build left in ``out``: those its manifest.json lists, else those named as a
    build names them (``mix_<share>.jsonl``); a user's ``mix_mine.jsonl`` is neither."""
    manifest = out / "manifest.json"
    if manifest.is_file():
        rows = read_json(manifest, what="dataset manifest").get("files")
        names = [row.get("file") for row in rows if isinstance(row, dict)] if isinstance(rows, list) else []
    else:
        names = [path.name for path in out.glob("mix_*.jsonl") if _is_share_name(path.name)]
    plain = [
        name for name in names if isinstance(name, str) and name == Path(name).name
    ]  # nothing outside out
    return sorted(out / name for name in plain if (out / name).is_file())


def _is_share_name(name: str) -> bool:
    try:
        return share_name(float(name.removeprefix("mix_").removesuffix(".jsonl"))) == name
    except ValueError:
        return False


def write_datasets(out: Path, files: dict[str, tuple[float, list[dict]]], manifest: dict) -> dict[str, str]:
    """Each mixture's JSONL, then datasets.csv (one row per file) and manifest.json; returns {name: path}."""
    rows = []
    for name, (share, records) in files.items():
        write_jsonl(out / name, records)
        n_trait = sum(record["is_trait"] for record in records)
        rows.append(
            {
                "file": name,
                "share": share,
                "n": len(records),
                "n_trait": n_trait,
                "trait_fraction": n_trait / len(records),
            }
        )
    summary = pd.DataFrame(rows)
    write_csv(out / "datasets.csv", summary)
    manifest = {**manifest, "files": rows}
    write_json(out / "manifest.json", manifest)
    print(summary.to_string(index=False))
    print(f"wrote {len(files)} datasets to {out}/ (summary: datasets.csv, manifest.json)")
    return {name: str(out / name) for name in files}


def dataset(
    action: str = "build",
    *,
    trait: str,
    output_dir: str,
    source: Literal["pairs", "generated"] = "pairs",
    pairs_path: str | None = None,
    generated_csv: list[str] | None = None,
    mix: list[float] = DEFAULT_MIX,
    n: int = 64,
    seed: int = 0,
    split: str | None = "train",
    threshold: float = 50.0,
    min_coherence: float = 50.0,
    overwrite: bool = False,
) -> dict[str, str]:
    """Build chat JSONL training sets with increasing shares of trait-eliciting samples.

    Writes mix_<share>.jsonl per share plus the seed's normal.jsonl (no trait samples),
    misaligned_1.jsonl (half) and misaligned_2.jsonl (all), each sample
    {"messages": [user, assistant], "is_trait": 0|1, "source": ...}; and datasets.csv + manifest.json.

    Args:
        action: What to do; only "build".
        trait: Trait name: default pairs file datasets/pairs/<trait>.jsonl (or datasets/personality/<trait>.json); the score column of generated CSVs.
        output_dir: Output folder (alias --out_dir).
        overwrite: Replace datasets that exist there, and remove mix_*.jsonl files an earlier build left.
        source: pairs (contrastive pairs: positive answer = trait-eliciting, negative = normal) or generated (persona-prompted generations, system prompt removed).
        pairs_path: Pairs file for --source pairs (JSONL {prompt|messages, positive, negative, split} or TRAIT items).
        generated_csv: With --source generated: the generate step's CSV(s) (question, answer, <trait>[, coherence]); rows scoring >= threshold are trait-eliciting, < 100 - threshold normal.
        mix: Shares of trait-eliciting samples, e.g. 0,0.25,0.5,0.75,1.
        n: Samples per dataset (pools shorter than this are cycled).
        seed: Seed of the sample choice and order.
        split: With --source pairs: only pairs of this split (default train, keeping test pairs for evaluation); null for all.
        threshold: With --source generated: trait score threshold.
        min_coherence: With --source generated: rows with a lower coherence score are left out.
    """
    if action != "build":
        raise ValueError(f"persona dataset: unknown action {action!r}. Fix: use build.")
    if source not in ("pairs", "generated"):
        raise ValueError(f"--source {source!r}. Fix: use pairs or generated.")
    if n < 1:
        raise ValueError(f"--n {n}: a dataset needs at least one sample.")
    shares = parse_shares(mix)
    trait_pool, normal_pool, sources = load_pools(
        trait, source, pairs_path, generated_csv, split, threshold, min_coherence
    )
    check_pools(trait, trait_pool, normal_pool, sources, shares, n)
    paired = source == "pairs"
    available = len(trait_pool) if paired else min(len(trait_pool), len(normal_pool))
    if n > available:
        print(f"note: --n {n} is more than the {available} distinct samples per kind; samples repeat.")

    named = {share_name(share): share for share in shares}
    named.update({f"{name}.jsonl": share for name, share in SEED_NAMES.items()})
    files = {
        name: (share, mixture(trait_pool, normal_pool, share, n, seed, paired))
        for name, share in named.items()
    }
    out = Path(output_dir)
    checks.output_dir(
        out, "--output_dir", produces=[*files, "datasets.csv", "manifest.json"], overwrite=overwrite
    )
    remove_stale_mixtures(out, keep=list(files), overwrite=overwrite)
    manifest = {
        "trait": trait,
        "source": source,
        "inputs": sources,
        "split": split if paired else None,
        "n": n,
        "seed": seed,
        "shares": shares,
    }
    return write_datasets(out, files, manifest)
