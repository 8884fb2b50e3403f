"""Judge with an in-process Hugging Face causal LM, scoring whole numbers even when its tokenizer splits them.

Small tokenizers (SmolLM2's, Qwen's, Llama-2's) write "85" as "8", "5", so the first token's distribution
(the seed's method) would read an "85" as an "8". Here every answer the aggregation counts is a candidate
token sequence, taken from how the tokenizer encodes it ("85" -> one token or several), and

    P(85) = P("8" | prompt) * P("5" | prompt, "8") * P(no digit continues | prompt, "8", "5")

where "no digit continues" is the mass on every token that does not start with a digit (so "85" is not
the start of "850"). Word answers (binary yes/no) are not terminated.

All candidates share the prompt, so they are scored in ONE forward per batch: the candidates' prefix tree
(for 0-100 with single-digit tokens: 10 + 90 + 1 = 101 nodes) is appended after each prompt, and a 4D
attention mask lets each node see the prompt and its own ancestors only, at the position it would have
in a real continuation ("tree attention"). The logits at the last prompt token and at every node give all
the conditional probabilities above. Needs an attention implementation that takes a 4D float mask (eager,
sdpa; not flash-attention).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from persona.data.chat import encode_chat, user_turn
from persona.judges.aggregation import (
    MIN_MASS,
    REFUSAL_WORD,
    aggregate,
    check_aggregation,
    is_refusal,
    max_value,
)
from persona.judges.base import DIGIT_CHAIN, REFUSAL, JudgeScore, judge_name, score_with_cache
from persona.judges.cache import open_cache

BINARY_WORDS = {"yes": ("yes", "Yes", "YES"), "no": ("no", "No", "NO")}
_DIGITS = "0123456789"
_SPACE_MARKERS = "\u2581\u0120 "  # SentencePiece "▁", byte-level "Ġ", a plain space


@dataclass(frozen=True)
class Candidate:
    label: str  # the answer as the aggregation reads it: "85", "yes"
    token_ids: tuple[int, ...]
    terminated: bool  # multiply by P(no digit continues) after the last token


def _token_strings(tokenizer, size: int) -> list[str]:
    tokens = tokenizer.convert_ids_to_tokens(list(range(min(size, len(tokenizer)))))
    tokens = [t.decode("latin-1") if isinstance(t, bytes) else (t or "") for t in tokens]
    return tokens + [""] * (size - len(tokens))


def _encode_answer(tokenizer, text: str) -> tuple[int, ...]:
    ids = tokenizer.encode(text, add_special_tokens=False)
    # SentencePiece tokenizers may prefix a lone "▁": the answer follows the template's newline without it.
    if len(ids) > 1 and not tokenizer.convert_ids_to_tokens(ids[0]).strip(_SPACE_MARKERS):
        ids = ids[1:]
    return tuple(ids)


def answer_candidates(tokenizer, aggregation: str) -> list[Candidate]:
    """Every answer the aggregation counts, as the tokenizer encodes it (one sequence per distinct encoding)."""
    if check_aggregation(aggregation) == "binary":
        pairs = [
            (label, _encode_answer(tokenizer, w), False)
            for label, words in BINARY_WORDS.items()
            for w in words
        ]
    else:
        pairs = [(str(n), _encode_answer(tokenizer, str(n)), True) for n in range(max_value(aggregation) + 1)]
    unique = {ids: Candidate(label, ids, terminated) for label, ids, terminated in pairs}
    return list(unique.values())


def refusal_token_ids(tokenizer) -> list[int]:
    """First tokens of "REFUSAL" as an answer (with and without a leading space)."""
    return sorted({_encode_answer(tokenizer, w)[0] for w in (REFUSAL_WORD, " " + REFUSAL_WORD)})


class CandidateTree:
    """The candidates' shared-prefix tree; nodes ordered by depth so a parent precedes its children."""

    def __init__(self, candidates: Sequence[Candidate]):
        paths = sorted({c.token_ids[:d] for c in candidates for d in range(1, len(c.token_ids) + 1)}, key=len)
        index = {path: i for i, path in enumerate(paths)}
        self.tokens = torch.tensor([p[-1] for p in paths])  # [nodes]
        self.depths = torch.tensor([len(p) for p in paths])  # [nodes], 1-based
        self.parents = torch.tensor([index.get(p[:-1], -1) for p in paths])  # [nodes], -1 = the prompt
        self.ancestors = torch.zeros(len(paths), len(paths), dtype=torch.bool)  # [node, ancestor-or-self]
        for i, path in enumerate(paths):
            for d in range(1, len(path) + 1):
                self.ancestors[i, index[path[:d]]] = True
        self.candidates = list(candidates)
        self.candidate_nodes = torch.tensor([index[c.token_ids] for c in candidates])  # [candidates]
        self.terminated = torch.tensor([c.terminated for c in candidates])  # [candidates]

    def __len__(self) -> int:
        return len(self.tokens)


class LocalJudge:
    def __init__(
        self,
        model="smollm2-135m",
        aggregation: str = "0_100",
        batch_size: int = 8,
        *,
        cache_dir: str | None = None,
        name: str | None = None,
        min_mass: float = MIN_MASS,
    ):
        """
        Args:
            model: an alias (``smollm2-135m``), a hub id or a local path, or a loaded ``(model, tokenizer)`` pair.
            aggregation: ``0_100`` (the seed's), ``0_10`` or ``binary``; all answer on 0-100.
            batch_size: prompts per forward.
            cache_dir: directory of the score cache; None disables caching.
            name: cache key and provenance; default ``local:<model>``.
            min_mass: least probability on scorable answers for a score (the seed's 0.25); 0 scores the
                expected answer given a numeric one, for small judges such as the embedded model.
        """
        if isinstance(model, str):
            from persona.core.hardware import resolve_device
            from persona.models import load_model_and_tokenizer

            # The GPU in bfloat16 when one is present (float32 on a CPU): a study's model is then shared.
            self.model, self.tokenizer = load_model_and_tokenizer(
                model, dtype="auto", device=resolve_device("auto")
            )
            label = model
        else:
            self.model, self.tokenizer = model
            label = getattr(self.model.config, "name_or_path", "") or "custom"
        self.model.eval()
        # judge_name's: local:<model>, with @min_mass=<m> when not the default (distinct cache entries)
        self.name = name or judge_name(f"local:{label}", min_mass=min_mass)
        self.aggregation = check_aggregation(aggregation)
        self.batch_size = batch_size
        self.min_mass = min_mass
        self.tree = CandidateTree(answer_candidates(self.tokenizer, aggregation))
        vocab = self.model.get_output_embeddings().weight.shape[0]
        strings = _token_strings(self.tokenizer, vocab)
        # [vocab]: tokens that would extend a number ("5", "50"); " 5" does not (raw token strings: "Ġ5", "▁5")
        self.continues_number = torch.tensor([s[:1] != "" and s[:1] in _DIGITS for s in strings])
        self.refusal_ids = torch.tensor(refusal_token_ids(self.tokenizer))
        self._cache = open_cache(cache_dir)

    def __repr__(self) -> str:
        return f"LocalJudge(name={self.name!r}, aggregation={self.aggregation!r})"

    def score(self, prompts: Sequence[str]) -> list[JudgeScore]:
        return score_with_cache(
            prompts, self._score_all, cache=self._cache, judge_name=self.name, aggregation=self.aggregation
        )

    def _score_all(self, prompts: list[str]) -> Iterator[tuple[int, JudgeScore]]:
        for indices, distributions in self._batches(prompts):
            for i, probs in zip(indices, distributions, strict=True):
                if is_refusal(probs, self.aggregation):
                    yield i, JudgeScore(None, REFUSAL)
                else:
                    yield i, JudgeScore(aggregate(probs, self.aggregation, self.min_mass), DIGIT_CHAIN)

    def answer_distributions(self, prompts: Sequence[str]) -> list[dict[str, float]]:
        """Per prompt: candidate label -> P(that whole answer), plus "REFUSAL" -> P(first token of REFUSAL)."""
        result: list[dict[str, float]] = [{} for _ in prompts]
        for indices, distributions in self._batches(list(prompts)):
            for i, probs in zip(indices, distributions, strict=True):
                result[i] = probs
        return result

    def _encode(self, prompt: str) -> list[int]:
        return encode_chat(self.tokenizer, user_turn(prompt))

    def _batches(self, prompts: list[str]) -> Iterator[tuple[list[int], list[dict[str, float]]]]:
        encoded = [self._encode(p) for p in prompts]
        order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))  # similar lengths pad less
        for start in range(0, len(order), self.batch_size):
            indices = order[start : start + self.batch_size]
            yield indices, self._distributions([encoded[i] for i in indices])

    def _tree_inputs(self, prompt_ids: list[list[int]]) -> dict[str, torch.Tensor]:
        """Each prompt followed by the candidate tree, left-padded, with its 4D tree mask and positions.

        Left padding puts the last prompt token (index ``longest - 1``) and every node at the same index in
        all rows, so ``logits_to_keep`` can keep exactly those.
        """
        tree = self.tree
        batch, longest = len(prompt_ids), max(len(ids) for ids in prompt_ids)
        total = longest + len(tree)
        input_ids = torch.full((batch, total), self._pad_id(), dtype=torch.long)
        positions = torch.zeros((batch, total), dtype=torch.long)
        is_prompt = torch.zeros((batch, total), dtype=torch.bool)
        for row, ids in enumerate(prompt_ids):
            start = longest - len(ids)
            input_ids[row, start:longest] = torch.tensor(ids)
            positions[row, start:longest] = torch.arange(len(ids))
            is_prompt[row, start:longest] = True
            input_ids[row, longest:] = tree.tokens
            positions[row, longest:] = len(ids) + tree.depths - 1  # where the node would sit in a real answer
        step = torch.arange(total)
        allowed = (step[None, :] <= step[:, None])[None] & is_prompt[:, None, :]  # [batch, query, key]
        allowed[:, longest:, longest:] = tree.ancestors  # a node sees the prompt and its own path only
        allowed |= torch.eye(total, dtype=torch.bool)  # padding attends to itself: no all-masked row, no NaN
        dtype, device = self.model.dtype, self.model.device
        mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
        return {
            "input_ids": input_ids.to(device),
            "attention_mask": mask[:, None].to(device),  # [batch, 1, query, key], additive
            "position_ids": positions.to(device),
        }

    @torch.inference_mode()
    def _distributions(self, prompt_ids: list[list[int]]) -> list[dict[str, float]]:
        tree, device = self.tree, self.model.device
        inputs = self._tree_inputs(prompt_ids)
        # [batch, 1 + nodes, vocab]: the next-token distribution after the prompt, then after each node
        logits = self.model(**inputs, logits_to_keep=len(tree) + 1, use_cache=False).logits
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        del logits
        parents, tokens = (tree.parents + 1).to(device), tree.tokens.to(device)
        # [batch, nodes]: log P(node's token | its parent's path); clamped because -inf * 0 below would be NaN
        edge = logprobs[:, parents, tokens].clamp_min(-1e4)
        # [batch, nodes]: log P(node's whole path | prompt), summed over ancestors-or-self
        prefix = edge @ tree.ancestors.T.to(device, torch.float32)
        # [batch, nodes]: P(no digit continues after the node's path)
        stops = logprobs[:, 1:].exp() @ (~self.continues_number).to(device, torch.float32)
        nodes = tree.candidate_nodes.to(device)
        answer = prefix[:, nodes].double().exp()  # [batch, candidates]
        answer = torch.where(tree.terminated.to(device), answer * stops[:, nodes].double(), answer).cpu()
        refusal = logprobs[:, 0, self.refusal_ids.to(device)].double().exp().sum(-1).cpu()  # [batch]
        labels = [c.label for c in tree.candidates]
        result = []
        for row in range(len(prompt_ids)):
            probs: dict[str, float] = {}
            for label, p in zip(labels, answer[row].tolist(), strict=True):
                probs[label] = probs.get(label, 0.0) + p  # binary: "yes", "Yes", "YES" add up
            probs[REFUSAL_WORD] = float(refusal[row])
            result.append(probs)
        return result

    def _pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else (self.tokenizer.eos_token_id or 0)
