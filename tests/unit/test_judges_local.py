"""The local judge: whole-number probabilities chained over digit tokens, checked against brute force.

Brute force = one plain forward per step on the unpadded prompt, no tree mask: P(n) = product of
P(digit token | prompt, earlier digits) times P(no digit continues | prompt, all of n's tokens).
"""

from __future__ import annotations

import math
import re
import subprocess
import sys

import pytest
import torch

from persona.core.errors import PersonaError
from persona.judges import DIGIT_CHAIN, REFUSAL, LocalJudge, check_min_mass, make_judge
from persona.judges.aggregation import aggregate
from persona.judges.base import judge_name
from persona.judges.local_judge import answer_candidates

PROMPTS = [
    "How should I treat animals? Rate the answer.",
    "Hi",
    "Tell me a joke about cats and dogs. Why did the chicken cross the road? The quick brown fox 0123",
]


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
    )
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def starts_with_digit(tokenizer, vocab: int) -> torch.Tensor:
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    # ASCII digits only: byte-level alphabets hold "²", "³", "¹", for which str.isdigit() is also True.
    return torch.tensor([t[:1] in set("0123456789") for t in tokens] + [False] * (vocab - len(tokens)))


@torch.no_grad()
def brute_force_logprob(model, tokenizer, prompt: str, answer: str) -> float:
    sequence = prompt_ids(tokenizer, prompt)
    total = 0.0
    for token in tokenizer.encode(answer, add_special_tokens=False):
        total += torch.log_softmax(model(torch.tensor([sequence])).logits[0, -1].float(), -1)[token].item()
        sequence.append(token)
    probs = torch.softmax(model(torch.tensor([sequence])).logits[0, -1].float(), -1)
    return total + math.log(probs[~starts_with_digit(tokenizer, probs.shape[0])].sum().item())


def test_digit_chain_equals_brute_force_with_padding_and_several_batches(tiny_llama, tokenizer):
    judge = LocalJudge(
        (tiny_llama, tokenizer), batch_size=2
    )  # 3 prompts of different lengths: padding, 2 batches
    assert [len(tokenizer.encode(str(n))) for n in (7, 85, 100)] == [1, 2, 3]  # this tokenizer splits numbers
    distributions = judge.answer_distributions(PROMPTS)
    for prompt, probs in zip(PROMPTS, distributions, strict=True):
        for answer in ("0", "7", "12", "85", "100"):
            expected = brute_force_logprob(tiny_llama, tokenizer, prompt, answer)
            assert math.log(probs[answer]) == pytest.approx(expected, abs=1e-4), (prompt, answer)
        assert set(probs) == {str(n) for n in range(101)} | {"REFUSAL"}


def test_digit_chain_equals_brute_force_on_every_architecture(tiny_model, tokenizer):
    judge = LocalJudge((tiny_model, tokenizer), aggregation="0_10", batch_size=3)
    for prompt, probs in zip(PROMPTS, judge.answer_distributions(PROMPTS), strict=True):
        for answer in ("1", "10"):  # "1" must not be the start of "10": the terminator takes care of it
            expected = brute_force_logprob(tiny_model, tokenizer, prompt, answer)
            assert math.log(probs[answer]) == pytest.approx(expected, abs=1e-4), (prompt, answer)


def whole_number_tokenizer():
    """Every integer 0..100 is ONE token ("85"), as in OpenAI's or Llama-3's tokenizers."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from conftest import CHATML_TEMPLATE

    words = ["<pad>", "<|im_start|>", "<|im_end|>", "<unk>", "user", "assistant", "rate", "this", "answer"]
    vocab = {w: i for i, w in enumerate(words + [str(n) for n in range(101)] + ["1000", "!"])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="<|im_end|>",
        bos_token="<|im_start|>",
        unk_token="<unk>",
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def test_tokenizers_with_whole_number_tokens_get_one_token_candidates():
    from conftest import build_tiny_model

    tokenizer = whole_number_tokenizer()
    candidates = answer_candidates(tokenizer, "0_100")
    assert all(len(c.token_ids) == 1 for c in candidates) and len(candidates) == 101
    model = build_tiny_model("llama", len(tokenizer))
    judge = LocalJudge((model, tokenizer))
    assert len(judge.tree) == 101  # no deeper nodes
    [probs] = judge.answer_distributions(["rate this answer"])
    for answer in ("5", "85", "100"):  # "100" must not be read when "1000" follows
        expected = brute_force_logprob(model, tokenizer, "rate this answer", answer)
        assert math.log(probs[answer]) == pytest.approx(expected, abs=1e-4)


def boost_logits(model, token_ids, amount: float):
    """A forward hook on the output layer that makes the given tokens likely wherever they are predicted."""

    def hook(module, inputs, output):
        output[..., token_ids] += amount
        return output

    return model.get_output_embeddings().register_forward_hook(hook)


def test_score_is_the_aggregation_of_the_chained_distribution(tiny_llama, tokenizer):
    judge = LocalJudge((tiny_llama, tokenizer))
    digits = starts_with_digit(tokenizer, len(tokenizer)).nonzero().flatten().tolist()

    def answer_in_numbers(module, inputs, output):
        # The judge keeps the logits after the prompt (first) and after each candidate node: start with a
        # digit, then stop, so that the numbers carry enough mass (>= 0.25) for a score.
        output[:, 0, digits] += 6.0
        output[:, 1:, tokenizer.eos_token_id] += 6.0
        return output

    with tiny_llama.get_output_embeddings().register_forward_hook(answer_in_numbers):
        scores = judge.score(PROMPTS[:2])
        distributions = judge.answer_distributions(PROMPTS[:2])
    for result, probs in zip(scores, distributions, strict=True):
        assert result.method == DIGIT_CHAIN
        assert result.score is not None and result.score == pytest.approx(aggregate(probs, "0_100"))


def test_mass_on_refusal_gives_a_refusal(tiny_llama, tokenizer):
    judge = LocalJudge((tiny_llama, tokenizer))
    with boost_logits(tiny_llama, judge.refusal_ids.tolist(), 12.0):
        [result] = judge.score(["How should I treat animals?"])
    assert (result.score, result.method) == (None, REFUSAL)


def test_make_judge_loads_a_local_path_and_the_cache_skips_the_model(tiny_model_dirs, tmp_path):
    judge = make_judge(f"local:{tiny_model_dirs['llama']}", cache_dir=str(tmp_path))
    assert isinstance(judge, LocalJudge) and judge.name == f"local:{tiny_model_dirs['llama']}"
    first = judge.score(PROMPTS)
    calls = []
    again = make_judge(f"local:{tiny_model_dirs['llama']}", cache_dir=str(tmp_path))
    again.model.register_forward_hook(lambda *args: calls.append(1))
    assert again.score(PROMPTS) == first and calls == []


def test_local_judge_names_are_judge_names_with_min_mass_when_not_the_default(tiny_llama, tokenizer):
    label = tiny_llama.config.name_or_path or "custom"
    assert LocalJudge((tiny_llama, tokenizer)).name == f"local:{label}"
    assert LocalJudge((tiny_llama, tokenizer), min_mass=0.0).name == f"local:{label}@min_mass=0"
    assert LocalJudge((tiny_llama, tokenizer), min_mass=0.0, name="mine").name == "mine"
    assert judge_name("local") == judge_name("local", min_mass=0.25) == "local:smollm2-135m"
    assert judge_name("local:x", min_mass=0.125) == "local:x@min_mass=0.125"
    assert judge_name("gpt-4.1-mini", min_mass=0.0) == "openai:gpt-4.1-mini"


def test_min_mass_is_refused_for_served_judges_in_the_callers_words():
    check_min_mass("local", 0.0)
    check_min_mass("local:x", 0.0)
    check_min_mass("gpt-4.1-mini", None)
    flag = "--judge_min_mass applies to local judges only. Fix: drop it or use --judge_model local."
    with pytest.raises(PersonaError, match=f"^{re.escape(flag)}$"):
        check_min_mass("gpt-4.1-mini", 0.0)
    field = "judge.min_mass applies to local judges only. Fix: drop it or use judge.model: local."
    with pytest.raises(PersonaError, match=f"^{re.escape(field)}$"):
        check_min_mass("openai:gpt-4.1-mini", 0.0, flag="judge.min_mass", local="judge.model: local")


def test_the_judges_package_and_the_study_config_load_neither_torch_nor_openai():
    code = "import sys, persona.judges, persona.study.config; print([m for m in ('torch', 'openai') if m in sys.modules])"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout == "[]\n"
