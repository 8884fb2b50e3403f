"""`persona generate`: persona-prompted answers to a trait's questions, judged for the trait and coherence.

As the seed's ``eval_persona.py``: every question is asked under every one of the trait's 5 instructions
(system prompt ``You are a/an <name> assistant. <instruction>``), ``n_per_question`` times each, with
question ids ``<trait>_<i>_<pos|neg>_<k>`` (``<trait>_<i>`` without a persona); sampling at temperature 1
(greedy when ``n_per_question == 1``), top-p 1, at least one new token.

Resumable. The plan (every (question_id, sample) key, in the seed's order) is cut into fixed batches, each
with its own seed derived from its keys. Finished rows are appended per batch to a per-rank JSONL journal
(``<output>.parts/rank<r>.jsonl``; one line per row, one write + fsync per batch), so ``kill -9`` loses at
most the batch in flight and a torn last line is dropped on resume. A re-run regenerates only batches with
unfinished keys (whole, with the same seed, writing only the missing keys), so a resumed run gives the same
rows as an uninterrupted one. At the end the CSV is rewritten atomically in plan order (row i of a pos file
pairs with row i of the neg file, as `persona extract` expects) and the journal removed. Rows whose judge
scores are missing keep empty cells; the next run of the same command re-judges them without regenerating.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
import statistics
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader

from persona.chat import has_chat_template, render_chat
from persona.models import DEFAULT_MODEL, load_model, load_tokenizer
from persona.steering import POSITIONS, SteeringSpec, generate_steered
from persona.store import KeyedJournal, atomic_write, check_signature
from persona.traits import Trait, coherence_prompt, load_trait
from persona.vectors import load_metadata, load_vector

log = logging.getLogger(__name__)

Key = tuple[str, int]  # (question_id, sample index)


def output_columns(trait: str) -> list[str]:
    return [
        "question",
        "prompt",
        "answer",
        "question_id",
        "sample",
        trait,
        "coherence",
        f"{trait}_method",
        "coherence_method",
        "judge",
    ]


# ------------------------------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class WorkItem:
    question_id: str
    sample: int
    question: str
    system: str | None  # the persona system prompt, None without a persona

    @property
    def key(self) -> Key:
        return (self.question_id, self.sample)

    def messages(self) -> list[dict[str, str]]:
        user = [{"role": "user", "content": self.question}]
        return user if self.system is None else [{"role": "system", "content": self.system}, *user]


def plan_items(
    trait: Trait,
    instruction_type: str | None,
    assistant_name: str | None,
    n_per_question: int,
    max_questions: int | None = None,
) -> list[WorkItem]:
    """Every (question, instruction, sample) in the seed's order: question i, then instruction k, then sample."""
    items = []
    for i, question in enumerate(trait.questions[:max_questions]):
        if instruction_type is None:
            items += [WorkItem(f"{trait.name}_{i}", s, question, None) for s in range(n_per_question)]
            continue
        for k in range(len(trait.instructions)):
            system = trait.system_prompt(instruction_type, k, assistant_name)
            qid = f"{trait.name}_{i}_{instruction_type}_{k}"
            items += [WorkItem(qid, s, question, system) for s in range(n_per_question)]
    return items


def batch_seed(seed: int, items: list[WorkItem]) -> int:
    """A seed that depends on the batch's keys only, so a resumed batch samples exactly as the first time."""
    text = f"{seed}|" + "|".join(f"{item.question_id}#{item.sample}" for item in items)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & (2**63 - 1)


def pending_batches(items: list[WorkItem], batch_size: int, done: set[Key], seed: int) -> list[dict]:
    """The fixed batches of the plan that still have unfinished keys, as plain dicts (Lightning-friendly)."""
    batches = []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        pending = [item.key not in done for item in chunk]
        if any(pending):
            batches.append(
                {
                    "seed": batch_seed(seed, chunk),
                    "question_id": [item.question_id for item in chunk],
                    "sample": [item.sample for item in chunk],
                    "question": [item.question for item in chunk],
                    "messages": [item.messages() for item in chunk],
                    "pending": pending,
                }
            )
    return batches


def order_key(row: dict) -> tuple:
    """Plan order from a row's key: question index, instruction index, sample (unparseable ids last)."""
    match = re.search(r"_(\d+)(?:_(?:pos|neg)_(\d+))?$", row["question_id"])
    if match is None:
        return (math.inf, 0, row["question_id"], row["sample"])
    return (int(match.group(1)), int(match.group(2) or -1), row["question_id"], row["sample"])


# ------------------------------------------------------------------------------------------------- storage


class ResponseStore:
    """One output: the finished CSV, a ``.meta.json`` with the settings, and per-rank journals of a run in progress."""

    def __init__(self, output_path: str | Path, trait: str):
        self.csv_path = Path(output_path)
        self.parts_dir = Path(f"{output_path}.parts")
        self.meta_path = Path(f"{output_path}.meta.json")
        self.trait = trait
        self.columns = output_columns(trait)
        self._journals: dict[int, KeyedJournal] = {}

    def journal(self, rank: int) -> KeyedJournal:
        if rank not in self._journals:
            self._journals[rank] = KeyedJournal(
                self.parts_dir / f"rank{rank}.jsonl",
                ("question_id", "sample"),
                damaged_path=f"{self.csv_path}.damaged",  # outlives the parts directory
            )
        return self._journals[rank]

    def journal_path(self, rank: int) -> Path:
        return self.journal(rank).path

    def remove_all(self) -> None:
        for path in (self.csv_path, self.meta_path):
            path.unlink(missing_ok=True)
        shutil.rmtree(self.parts_dir, ignore_errors=True)

    def check_meta(self, signature: dict) -> None:
        """Refuse to mix rows made with other settings; write the settings on a fresh output."""
        check_signature(
            self.meta_path,
            signature,
            command="persona generate",
            subject=self.csv_path,
            fix="choose another --output_path, or pass --overwrite true to replace it",
            owned=(self.csv_path, self.parts_dir),
        )

    def load(self) -> dict[Key, dict]:
        """Every finished row, keyed. The CSV wins over the journals (it holds re-judged scores)."""
        rows: dict[Key, dict] = {}
        for path in sorted(self.parts_dir.glob("rank*.jsonl")):
            for key, row in KeyedJournal(path, ("question_id", "sample")).load().items():
                rows.setdefault(key, row)
        if self.csv_path.is_file():
            for row in self.read_csv():
                rows[(row["question_id"], row["sample"])] = row
        return rows

    def read_csv(self) -> list[dict]:
        with self.csv_path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            missing = [c for c in self.columns if c not in (reader.fieldnames or [])]
            if missing:
                raise ValueError(
                    f"{self.csv_path}: missing column(s) {', '.join(missing)}. Fix: pass "
                    "--overwrite true to regenerate it, or choose another --output_path."
                )
            rows = []
            for row in reader:
                row = {column: (row[column] if row[column] != "" else None) for column in self.columns}
                row["sample"] = int(row["sample"])
                row["answer"] = row["answer"] or ""
                for metric in (self.trait, "coherence"):
                    row[metric] = None if row[metric] is None else float(row[metric])
                rows.append(row)
            return rows

    def append(self, rank: int, rows: list[dict]) -> None:
        self.journal(rank).append(rows)

    def write_csv(self, rows: list[dict]) -> None:
        def write(tmp: Path) -> None:
            with tmp.open("w", newline="", encoding="utf-8") as handle:
                # Text always quoted: a bare "\r" in an answer would otherwise split the row for pandas.
                writer = csv.DictWriter(
                    handle, fieldnames=self.columns, lineterminator="\n", quoting=csv.QUOTE_NONNUMERIC
                )
                writer.writeheader()
                for row in sorted(rows, key=order_key):
                    writer.writerow({c: ("" if row.get(c) is None else row[c]) for c in self.columns})
                handle.flush()
                os.fsync(handle.fileno())

        atomic_write(self.csv_path, write)
        shutil.rmtree(self.parts_dir, ignore_errors=True)


# ------------------------------------------------------------------------------------------------- judging


def needs_score(row: dict, metric: str) -> bool:
    """Not judged yet, or the judge call failed. A refusal or unreadable verdict is an answer: not retried."""
    return row.get(metric) is None and row.get(f"{metric}_method") in (None, "failed")


def score_rows(rows: list[dict], trait: Trait, judge) -> list[str]:
    """Fill the trait and coherence scores that :func:`needs_score` in place; returns the judge's errors."""
    errors = []
    for metric, make_prompt in ((trait.name, trait.judge_prompt), ("coherence", coherence_prompt)):
        todo = [row for row in rows if needs_score(row, metric)]
        if not todo:
            continue
        scores = judge.score([make_prompt(row["question"], row["answer"]) for row in todo])
        if len(scores) != len(todo):
            raise RuntimeError(f"judge {judge.name!r} returned {len(scores)} scores for {len(todo)} prompts.")
        for row, score in zip(todo, scores, strict=True):
            value = score.score
            row[metric] = float(value) if value is not None and math.isfinite(value) else None
            row[f"{metric}_method"] = score.method
            row["judge"] = judge.name
            if score.error:
                errors.append(score.error)
    return errors


# ------------------------------------------------------------------------------------------------- Lightning


class ResponseGenerator(L.LightningModule):
    """predict_step: generate answers for one planned batch (its own seed); rows out, unjudged."""

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        dtype: str = "float32",
        trust_remote_code: bool = False,
        max_tokens: int = 1000,
        temperature: float = 1.0,
        vector_path: str | None = None,
        layer: int | None = None,
        coef: float | None = None,
        steering_type: str = "response",
    ):
        super().__init__()
        self.save_hyperparameters()
        self.model = None

    def configure_model(self) -> None:
        if self.model is not None:
            return
        hp = self.hparams
        tokenizer = load_tokenizer(hp.model, padding_side="left", trust_remote_code=hp.trust_remote_code)
        if not has_chat_template(tokenizer):
            raise ValueError(f"{hp.model} has no chat template. Fix: use an instruct/chat model.")
        self.tokenizer = tokenizer
        self.model = load_model(hp.model, dtype=hp.dtype, trust_remote_code=hp.trust_remote_code)
        self.model.requires_grad_(False)
        self.specs = (
            []
            if hp.vector_path is None
            else [SteeringSpec(hp.layer, load_vector(hp.vector_path), hp.coef, positions=hp.steering_type)]
        )

    def predict_step(self, batch: dict, batch_idx: int) -> list[dict]:
        random.seed(batch["seed"])
        torch.manual_seed(batch["seed"])
        hp = self.hparams
        sampling = {"top_p": 1.0, "top_k": 0} if hp.temperature > 0 else {}
        answers = generate_steered(
            self.model,
            self.tokenizer,
            batch["messages"],
            self.specs,
            max_new_tokens=hp.max_tokens,
            temperature=hp.temperature,
            batch_size=len(batch["messages"]),
            min_new_tokens=1,
            **sampling,
        )
        prompts = [render_chat(self.tokenizer, m) for m in batch["messages"]]
        return [
            {"question": q, "prompt": p, "answer": a, "question_id": qid, "sample": int(s)}
            for q, p, a, qid, s in zip(
                batch["question"], prompts, answers, batch["question_id"], batch["sample"], strict=True
            )
        ]


class ResponseWriter(BasePredictionWriter):
    """Judges each batch's new rows and appends them to this rank's journal."""

    def __init__(self, store: ResponseStore, trait: Trait, judge):
        super().__init__(write_interval="batch")
        self.store, self.trait, self.judge = store, trait, judge
        self.errors: list[str] = []

    def write_on_batch_end(
        self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0
    ):
        rows = [row for row, pending in zip(prediction, batch["pending"], strict=True) if pending]
        for row in rows:
            row.update(
                {
                    self.trait.name: None,
                    "coherence": None,
                    f"{self.trait.name}_method": None,
                    "coherence_method": None,
                    "judge": None,
                }
            )
        self.errors += score_rows(rows, self.trait, self.judge)
        self.store.append(trainer.global_rank, rows)


def _unwrap(items: list[dict]) -> dict:
    return items[0]


# ------------------------------------------------------------------------------------------------- command


def build_judge(spec: str, base_url: str | None, min_mass: float | None = None):
    from persona.judges import make_judge

    if min_mass is None:
        return make_judge(spec, base_url=base_url)
    if not spec.startswith("local"):
        raise ValueError(
            "--judge_min_mass applies to local judges only. Fix: drop it or use --judge_model local."
        )
    return make_judge(spec, base_url=base_url, min_mass=min_mass)


def _check_writable(path: Path) -> None:
    if path.is_dir():
        raise ValueError(
            f"--output_path {path} is a folder. Fix: give a file name, e.g. {path / 'responses.csv'}."
        )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.check"):
            pass
    except OSError as error:
        raise ValueError(
            f"Cannot write to {path.parent} ({error}). Fix: choose a writable --output_path."
        ) from error


def _is_launch_rank_zero() -> bool:
    # Under Lightning's ddp launcher every rank re-runs this command; only the first may delete or create files.
    return os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0"


def _mean_std(values: list[float]) -> str:
    if not values:
        return "no scores"
    return f"{statistics.fmean(values):.2f} +- {statistics.stdev(values) if len(values) > 1 else 0.0:.2f}"


def finalize(store: ResponseStore, trait: Trait, stale: set[Key], judge_factory, errors: list[str]) -> dict:
    """Re-judge rows from earlier runs that lack a score, write the CSV in plan order, report what is missing."""
    rows = store.load()
    retry = [rows[key] for key in stale if key in rows]
    if retry:
        errors = errors + score_rows(retry, trait, judge_factory())
    store.write_csv(list(rows.values()))
    print(f"{store.csv_path}: {len(rows)} rows")
    missing = {}
    for metric in (trait.name, "coherence"):
        print(f"{metric}: {_mean_std([r[metric] for r in rows.values() if r.get(metric) is not None])}")
        why = Counter(
            row.get(f"{metric}_method") or "not judged" for row in rows.values() if row.get(metric) is None
        )
        missing[metric] = dict(why)
    if any(missing.values()):
        counts = "; ".join(
            f"{m}: " + ", ".join(f"{n} {why}" for why, n in c.items()) for m, c in missing.items() if c
        )
        shown = "; ".join(sorted(set(errors))[:3])
        print(
            f"Missing judge scores (left empty): {counts}."
            + (f" Judge errors: {shown}." if shown else "")
            + (" Re-run the same command to retry the failed ones." if "failed" in counts else "")
        )
    return {"rows": len(rows), "missing": missing}


def generate(
    trait: str,
    output_path: str,
    model: str = DEFAULT_MODEL,
    persona_instruction_type: str | None = None,
    assistant_name: str | None = None,
    version: str = "extract",
    n_per_question: int = 10,
    max_questions: int | None = None,
    max_tokens: int = 1000,
    temperature: float | None = None,
    judge_model: str = "local",
    judge_base_url: str | None = None,
    judge_min_mass: float | None = None,
    coef: float | None = None,
    vector_path: str | None = None,
    layer: int | None = None,
    steering_type: str = "response",
    batch_size: int = 16,
    seed: int = 0,
    overwrite: bool = False,
    dtype: str = "float32",
    accelerator: str = "auto",
    devices: int = 1,
    strategy: str = "auto",
    trust_remote_code: bool = False,
) -> str:
    """Answer a trait's questions under persona system prompts (or steering) and judge each answer 0-100.

    Writes a CSV with question, prompt, answer, question_id, sample, <trait>, coherence (+ <trait>_method,
    coherence_method, judge); `persona extract` reads a pos and a neg file. Re-running the same command
    resumes an interrupted run and retries missing judge scores.

    Args:
        trait: Trait name (datasets/traits/<version>/<trait>.json) or a trait file/folder path.
        output_path: The CSV to write (resumed if it exists and was made with the same settings).
        model: Model alias (smollm2-135m, the embedded default), hub id or local path.
        persona_instruction_type: pos, neg or none: which instruction of each pair goes into the system prompt.
        assistant_name: Name in "You are a/an <name> assistant."; default the trait (pos) or its antonym/"helpful" (neg).
        version: extract or eval: which question set.
        n_per_question: Samples per (question, instruction).
        max_questions: Only the first N questions (quick runs).
        max_tokens: Maximum new tokens per answer.
        temperature: Sampling temperature; default 1.0, or 0 (greedy) when n_per_question is 1, as the seed.
        judge_model: Judge: local (in-process smollm2-135m) or a model served by an OpenAI-compatible API.
        judge_base_url: Base URL of the judge's OpenAI-compatible API (key from the environment).
        judge_min_mass: Local judges only: least probability on numeric answers for a score (default the seed's 0.25); 0 scores the expected number given a numeric answer, which small judges such as the embedded model need.
        coef: Steering coefficient (with vector_path and layer).
        vector_path: Vector file [num_layers+1, hidden] to steer with.
        layer: Layer to steer at (0 = embeddings, L = output of block L-1).
        steering_type: Positions to steer: response, generated, prompt or all.
        batch_size: Answers generated per batch (also the unit of resumption).
        seed: Base seed; each batch's seed is derived from it and the batch's keys.
        overwrite: Start over, deleting an existing output_path and its journal.
        dtype: Model dtype: float32, bfloat16, float16 or auto.
        accelerator: Lightning accelerator (cpu, gpu, auto).
        devices: Devices (processes); batches are sharded across ranks.
        strategy: Lightning strategy (auto, ddp, ddp_spawn).
        trust_remote_code: Allow custom model code from the hub.
    """
    # Everything that can be wrong with the inputs fails here, before a model loads.
    instruction_type = None if persona_instruction_type in (None, "none") else persona_instruction_type
    if instruction_type not in (None, "pos", "neg"):
        raise ValueError(
            f"--persona_instruction_type {persona_instruction_type!r}. Fix: use pos, neg or none."
        )
    for flag, value in (
        ("n_per_question", n_per_question),
        ("max_tokens", max_tokens),
        ("batch_size", batch_size),
    ):
        if value < 1:
            raise ValueError(f"--{flag} {value}: must be at least 1.")
    if max_questions is not None and max_questions < 1:
        raise ValueError(f"--max_questions {max_questions}: must be at least 1 (or left out for all).")
    steering = {"coef": coef, "vector_path": vector_path, "layer": layer}
    given = [f"--{k}" for k, v in steering.items() if v is not None]
    if given and len(given) != 3:
        absent = [f"--{k}" for k, v in steering.items() if v is None]
        raise ValueError(
            f"Steering needs --coef, --vector_path and --layer together; got {', '.join(given)} "
            f"without {', '.join(absent)}. Fix: pass all three, or none."
        )
    if steering_type not in POSITIONS:
        raise ValueError(f"--steering_type {steering_type!r}. Fix: use one of {', '.join(POSITIONS)}.")
    if vector_path is not None:
        SteeringSpec(
            layer, load_vector(vector_path), coef, positions=steering_type
        )  # file readable, layer in range
        source_model = load_metadata(vector_path).get("model")
        if source_model not in (None, model):
            log.warning("%s was extracted from %s, not %s", vector_path, source_model, model)
    if temperature is None:
        temperature = 0.0 if n_per_question == 1 else 1.0
    if temperature < 0:
        raise ValueError(f"--temperature {temperature}: must be >= 0 (0 = greedy).")
    loaded = load_trait(trait, version)
    if instruction_type is None and assistant_name is not None:
        log.warning("--assistant_name is ignored without --persona_instruction_type pos|neg")
    path = Path(output_path)
    _check_writable(path)

    items = plan_items(loaded, instruction_type, assistant_name, n_per_question, max_questions)
    content = json.dumps(
        [loaded.questions, [(p.pos, p.neg) for p in loaded.instructions], loaded.eval_prompt]
    )
    signature = {
        "model": model,
        "dtype": dtype,
        "trait": loaded.name,
        "version": version,
        "trait_sha256": hashlib.sha256(content.encode()).hexdigest()[:16],
        "persona_instruction_type": instruction_type,
        "assistant_name": None
        if instruction_type is None
        else (assistant_name or loaded.assistant_name(instruction_type)),
        "max_tokens": max_tokens,
        "temperature": temperature,
        "seed": seed,
        "steering": None
        if vector_path is None
        else {
            "vector_path": str(vector_path),
            "layer": layer,
            "coef": float(coef),
            "steering_type": steering_type,
        },
    }
    store = ResponseStore(path, loaded.name)
    if _is_launch_rank_zero():
        if overwrite:
            store.remove_all()
        store.check_meta(signature)
    existing = store.load()
    stale = {
        key for key, row in existing.items() if any(needs_score(row, m) for m in (loaded.name, "coherence"))
    }
    batches = pending_batches(items, batch_size, set(existing), seed)
    print(
        f"{loaded.name} ({loaded.path}): {len(items)} answers planned, "
        f"{sum(sum(b['pending']) for b in batches)} to generate"
    )

    judge_cache = []

    def judge_factory():  # built once, and only when something needs judging
        if not judge_cache:
            judge_cache.append(build_judge(judge_model, judge_base_url, judge_min_mass))
        return judge_cache[0]

    errors: list[str] = []
    is_global_zero = True
    if batches:
        writer = ResponseWriter(store, loaded, judge_factory())
        generator = ResponseGenerator(
            model=model,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            max_tokens=max_tokens,
            temperature=temperature,
            vector_path=vector_path,
            layer=layer,
            coef=coef,
            steering_type=steering_type,
        )
        trainer = L.Trainer(
            accelerator=accelerator,
            devices=devices,
            strategy=strategy,
            logger=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            callbacks=[writer],
        )
        loader = DataLoader(batches, batch_size=1, shuffle=False, collate_fn=_unwrap)
        trainer.predict(generator, dataloaders=loader, return_predictions=False)
        trainer.strategy.barrier("persona-generate")
        is_global_zero, errors = trainer.is_global_zero, writer.errors
    if is_global_zero:
        finalize(store, loaded, stale, judge_factory, errors)
    return str(path)
