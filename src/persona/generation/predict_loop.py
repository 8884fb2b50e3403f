"""The predict loop of `persona generate`: answers per planned batch, judged per batch, journaled per rank."""

from __future__ import annotations

import logging
import math
import random
import statistics
from collections import Counter

import lightning as L
import torch
from lightning.pytorch import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException
from tqdm.auto import tqdm

from persona.core.errors import SIGTERM_EXIT, PersonaError
from persona.data.chat import answer_text, encode_chat, has_chat_template, render_chat
from persona.data.traits import Trait, coherence_prompt
from persona.generation.engine import Engine, EngineRequest
from persona.generation.journal import Key, ResponseStore, pending_batches
from persona.generation.on_engine import engine_blocker, engine_config, stop_ids, stream_results
from persona.models import DEFAULT_MODEL, context_length, load_model, load_tokenizer
from persona.steering import CapSpec, Gate, RowInterventions, SteeringSpec, check_room, generate_steered
from persona.vectors import load_vector

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------------- judging


def needs_score(row: dict, metric: str, judge: str | None = None) -> bool:
    """Not judged yet, the judge call failed, or another judge than ``judge`` gave the verdict (a re-run
    with a new judge re-judges the kept answers). A refusal or unreadable verdict is an answer: not retried."""
    if judge is not None and row.get("judge") not in (None, judge):
        return True
    return row.get(metric) is None and row.get(f"{metric}_method") in (None, "failed")


def score_rows(rows: list[dict], trait: Trait, judge) -> list[str]:
    """Fill the trait and coherence scores that :func:`needs_score` in place; returns the judge's errors."""
    errors = []
    for metric, make_prompt in ((trait.name, trait.judge_prompt), ("coherence", coherence_prompt)):
        todo = [row for row in rows if needs_score(row, metric, judge.name)]
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


def command_specs(hp) -> list:
    """`persona generate`'s interventions: the push (``coef``; None: none), then the cap (``cap_lo``/``cap_hi``, every
    position) on the same vector and layer; both gated by ``when_above``/``when_below`` on the same vector there."""
    vector = load_vector(hp.vector_path)
    gate = None
    if hp.when_above is not None or hp.when_below is not None:
        gate = Gate(hp.layer, vector, above=hp.when_above, below=hp.when_below)
    specs = []
    if hp.coef is not None:
        specs.append(SteeringSpec(hp.layer, vector, hp.coef, positions=hp.steering_type, when=gate))
    if hp.cap_lo is not None or hp.cap_hi is not None:
        specs.append(CapSpec(hp.layer, vector, hp.cap_lo, hp.cap_hi, when=gate))
    return specs


class ResponseGenerator(L.LightningModule):
    """predict_step: one rank's share of the planned batches; each answer journaled (and judged) as it is made.

    On the engine (:mod:`persona.generation.on_engine`) every pending answer of the share is submitted at once
    and journaled the moment it finishes, then judged; on the static path each planned batch is generated with
    its own seed, judged and journaled, as before the engine."""

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
        fast: bool | str = "auto",
        cap_lo: float | None = None,
        cap_hi: float | None = None,
        when_above: float | None = None,
        when_below: float | None = None,
        engine: bool = True,
        batch_size: int = 16,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.model = None
        self.fast_generator = None

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
        self.specs = [] if hp.vector_path is None else command_specs(hp)
        self.static_reason = "--engine false" if not hp.engine else engine_blocker(self.model, self.specs)
        if self.static_reason is not None:
            log.info("persona generate: the static path (%s)", self.static_reason)

    def on_predict_start(self) -> None:
        # One fast-generation session for the whole run: its decode step compiles once, not once per batch.
        from persona.steering.fast import FastGenerator, fast_mode

        if self.static_reason is not None and fast_mode(self.hparams.fast, self.device) != "off":
            self.fast_generator = FastGenerator(self.model, self.hparams.fast).__enter__()

    def on_predict_end(self) -> None:
        if self.fast_generator is not None:  # its hooks leave the model
            self.fast_generator.__exit__(None, None, None)
            self.fast_generator = None

    def teardown(self, stage: str) -> None:
        self.on_predict_end()  # also after a failed run

    def predict_step(self, share: list[dict], batch_idx: int) -> list:
        writer = next(cb for cb in self.trainer.callbacks if isinstance(cb, ResponseWriter))
        rank = self.trainer.global_rank
        total = sum(sum(batch["pending"]) for batch in share)
        with tqdm(total=total, desc="answers", unit="answer", disable=rank != 0) as bar:
            if self.static_reason is None:
                engine_answers(self, share, writer, bar)
                return []  # everything is journaled (Lightning warns about a None)
            for batch in share:
                self.stop_on_sigterm()
                rows = [row for row, pending in zip(self._static_batch(batch), batch["pending"], strict=True)
                        if pending]  # fmt: skip
                writer.judge_and_journal(rank, rows)
                bar.update(len(rows))
        return []

    def stop_on_sigterm(self) -> None:
        # The share is one step, so StopOnSigterm (between steps) cannot stop it between batches.
        if self.trainer.received_sigterm:
            raise SIGTERMException(SIGTERM_EXIT)

    def _static_batch(self, batch: dict) -> list[dict]:
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
            fast=self.fast_generator or False,
            min_new_tokens=1,
            **sampling,
        )
        return [answer_row(self.tokenizer, batch, index, answer) for index, answer in enumerate(answers)]


def answer_row(tokenizer, batch: dict, index: int, answer: str) -> dict:
    """The CSV row of answer ``index`` of a planned batch, its judge columns empty."""
    return {
        "question": batch["question"][index],
        "prompt": render_chat(tokenizer, batch["messages"][index]),
        "answer": answer,
        "question_id": batch["question_id"][index],
        "sample": int(batch["sample"][index]),
    }


def engine_answers(module: ResponseGenerator, share: list[dict], writer, bar) -> None:
    """Every pending answer of ``share`` on one engine: each journaled unjudged as it finishes, then all judged
    in chunks of ``batch_size`` and journaled again (the judged row supersedes; a run killed before that re-judges)."""
    hp, tokenizer = module.hparams, module.tokenizer
    work = [(batch, i) for batch in share for i, pending in enumerate(batch["pending"]) if pending]
    prompts = [encode_chat(tokenizer, batch["messages"][i]) for batch, i in work]
    check_room(prompts, hp.max_tokens, context_length(tokenizer, module.model.config))
    stops, rows = stop_ids(module.model, tokenizer), RowInterventions(module.specs)
    requests = [
        EngineRequest(prompt, hp.max_tokens, rows, temperature=hp.temperature, stop_token_ids=stops,
                      seed=batch["row_seeds"][i] if hp.temperature > 0 else None, min_new_tokens=1)
        for prompt, (batch, i) in zip(prompts, work, strict=True)
    ]  # fmt: skip
    config = engine_config(hp.batch_size, max((len(p) for p in prompts), default=1), hp.max_tokens)
    finished = []
    with Engine(module.model, config) as engine:
        for index, result in stream_results(engine, requests, 4 * hp.batch_size, module.stop_on_sigterm):
            batch, i = work[index]
            row = answer_row(tokenizer, batch, i, answer_text(tokenizer, result.tokens))
            writer.journal(module.trainer.global_rank, [writer.unjudged(row)])
            finished.append(row)
            bar.update(1)
    for start in range(0, len(finished), hp.batch_size):
        module.stop_on_sigterm()
        writer.judge_and_journal(module.trainer.global_rank, finished[start : start + hp.batch_size])


class ResponseWriter(Callback):
    """Journals this rank's rows: as made (:meth:`journal`) and judged (:meth:`judge_and_journal`)."""

    def __init__(self, store: ResponseStore, trait: Trait, judge):
        self.store, self.trait, self.judge = store, trait, judge
        self.errors: list[str] = []

    def unjudged(self, row: dict) -> dict:
        metric = self.trait.name
        return {
            **row,
            **dict.fromkeys((metric, "coherence", f"{metric}_method", "coherence_method", "judge")),
        }

    def journal(self, rank: int, rows: list[dict]) -> None:
        self.store.append(rank, rows)

    def judge_and_journal(self, rank: int, rows: list[dict]) -> None:
        rows = [self.unjudged(row) for row in rows]
        self.errors += score_rows(rows, self.trait, self.judge)
        self.store.append(rank, rows)


def _share(batches: list[dict]) -> list[dict]:
    return batches


def build_judge(
    spec: str,
    base_url: str | None,
    min_mass: float | None = None,
    *,
    timeout: float | None = None,
    concurrency: int | None = None,
):
    """The judge of a command's --judge_* flags, caching its scores under the persona cache directory."""
    from persona.judges import check_min_mass, make_judge
    from persona.models import cache_root

    check_min_mass(spec, min_mass)
    kwargs: dict = {"cache_dir": str(cache_root() / "judge")}
    if spec.startswith("local"):
        if min_mass is not None:
            kwargs["min_mass"] = min_mass
    else:
        kwargs.update(
            {k: v for k, v in (("timeout", timeout), ("max_concurrency", concurrency)) if v is not None}
        )
    return make_judge(spec, base_url=base_url, **kwargs)


def _is_launch_rank_zero() -> bool:
    # Under Lightning's ddp launcher every rank re-runs this command; only the first may delete or create files.
    from lightning.pytorch.utilities import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


def _mean_std(values: list[float]) -> str:
    if not values:
        return "no scores"
    return f"{statistics.fmean(values):.2f} +- {statistics.stdev(values) if len(values) > 1 else 0.0:.2f}"


def missing_reason(method: str | None) -> str:
    """Why a score is empty, in words (the method column keeps the code)."""
    return {None: "not judged", "failed": "failed", "refusal": "refused"}.get(
        method, "the judge gave no number"
    )


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
            missing_reason(row.get(f"{metric}_method")) for row in rows.values() if row.get(metric) is None
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
    unscored = [row for row in rows.values() if row.get(trait.name) is None]
    if (
        rows
        and len(unscored) == len(rows)
        and all(row.get(f"{trait.name}_method") not in ("failed", None) for row in unscored)
    ):
        print(
            f"note: the judge answered every {trait.name} prompt without a number (or refused). A small judge rarely "
            "puts the seed's 0.25 of its probability on numbers: use a stronger judge, or for a local judge "
            "--judge_min_mass 0 (its expected number given a numeric answer)."
        )
    failed = sum(row.get(f"{trait.name}_method") == "failed" for row in rows.values())
    if rows and failed == len(rows):
        shown = sorted(set(errors))[0] if errors else "no error was reported"
        raise PersonaError(
            f"every judge call failed ({len(rows)} rows in {store.csv_path} have no {trait.name} score; first error: "
            f"{shown}). The answers are kept. Fix: check --judge_model/--judge_base_url (is the server up?), "
            "then re-run the same command to judge them."
        )
    return {"rows": len(rows), "missing": missing}


def run_generation(
    store: ResponseStore, trait: Trait, items, signature: dict, *, overwrite: bool, batch_size: int, seed: int,
    model: str, dtype: str, max_tokens: int, temperature: float, steering: dict | None, judge: dict, trainer: dict,
    trust_remote_code: bool, engine: bool = True,
) -> str:  # fmt: skip
    """Resume or start the run in ``store``: generate the unfinished answers (each rank its share of the planned
    batches, in one predict step), judge, write the CSV."""
    if _is_launch_rank_zero():
        if overwrite:
            store.remove_all()
        store.check_meta(signature)
    from persona.judges.base import judge_name

    current = judge_name(judge["spec"], min_mass=judge["min_mass"])
    existing = store.load()
    stale = {
        key
        for key, row in existing.items()
        if any(needs_score(row, m, current) for m in (trait.name, "coherence"))
    }
    batches = pending_batches(items, batch_size, set(existing), seed)
    print(
        f"{trait.name} ({trait.path}): {len(items)} answers planned, {sum(sum(b['pending']) for b in batches)} to generate"
    )
    built = []

    def judge_factory():  # built once, and only when something needs judging
        if not built:
            built.append(build_judge(**judge))
        return built[0]

    errors: list[str] = []
    is_global_zero = True
    if batches:
        writer = ResponseWriter(store, trait, judge_factory())
        generator = ResponseGenerator(
            model=model, dtype=dtype, trust_remote_code=trust_remote_code, max_tokens=max_tokens,
            temperature=temperature, engine=engine, batch_size=batch_size, **(steering or {}),
        )  # fmt: skip
        from torch.utils.data import DataLoader

        from persona.core.hardware import make_trainer

        lightning = make_trainer(**trainer, callbacks=[writer])
        # One step per rank: the distributed sampler deals batch i to rank i % world_size, as one batch per step did.
        loader = DataLoader(batches, batch_size=len(batches), shuffle=False, collate_fn=_share)
        lightning.predict(generator, dataloaders=loader, return_predictions=False)
        lightning.strategy.barrier("persona-generate")
        is_global_zero, errors = lightning.is_global_zero, writer.errors
    if is_global_zero:
        finalize(store, trait, stale, judge_factory, errors)
    return str(store.csv_path)
