"""The fast generation path (static KV cache, compiled decode step) gives the plain path's steered tokens.

On CPU the compile tests use the ``eager`` backend: dynamo traces the hooks and guards exactly as on a GPU,
without inductor's code generation (one inductor run is in the GPU test below, which a GPU machine runs).
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch._dynamo.utils import counters
from transformers import CompileConfig

from persona.data.batches import left_pad
from persona.hooks import block_hooks
from persona.hooks.registry import ForwardState
from persona.steering import SteeringSpec, generate_steered, steer
from persona.steering import fast as fast_generation
from persona.steering.fast import (
    FastGenerator,
    fast_mode,
    fast_path_supported,  # noqa: E402
)

pytestmark = pytest.mark.skipif(fast_path_supported() is not None, reason=str(fast_path_supported()))

POSITIONS = ("response", "generated", "prompt", "all")
GREEDY = {"max_new_tokens": 6, "min_new_tokens": 6, "do_sample": False, "pad_token_id": 0}


def eager_compile() -> CompileConfig:
    return CompileConfig(backend="eager", mode=None)


def direction(seed: int, norm: float = 2.0) -> torch.Tensor:
    vector = torch.randn(32, generator=torch.Generator().manual_seed(seed))
    return vector / vector.norm() * norm


def left_padded(tokenizer):
    texts = ["Hello there, my good friend.", "Hi", "Why did the chicken"]
    return left_pad([tokenizer(text)["input_ids"] for text in texts], tokenizer.pad_token_id)


def specs_for(positions: str) -> list[SteeringSpec]:
    # Two specs at one layer (they compose in order) and one at another.
    return [
        SteeringSpec(2, direction(0), 1.5, positions=positions),
        SteeringSpec(2, direction(1), -0.7, positions="all"),
        SteeringSpec(1, direction(2), 1.0, positions=positions),
    ]


def plain_generate(model, input_ids, attention_mask, specs, **kwargs):
    with steer(model, specs):
        return model.generate(input_ids=input_ids, attention_mask=attention_mask, **GREEDY, **kwargs)


def hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("positions", POSITIONS)
@pytest.mark.parametrize("mode", ["static"])
def test_fast_path_gives_the_plain_paths_steered_tokens(tiny_model, tokenizer, positions, mode):
    input_ids, attention_mask = left_padded(tokenizer)
    specs = specs_for(positions)
    expected = plain_generate(tiny_model, input_ids, attention_mask, specs)
    unsteered = tiny_model.generate(input_ids=input_ids, attention_mask=attention_mask, **GREEDY)
    assert not torch.equal(expected, unsteered), (
        "the specs must change the tokens for this test to mean anything"
    )
    hooks_before = hook_count(tiny_model)
    with FastGenerator(tiny_model, "static" if mode == "static" else eager_compile()) as generator:
        steered = generator.generate(input_ids, attention_mask, specs, **GREEDY)
        plain = generator.generate(input_ids, attention_mask, [], **GREEDY)
        assert generator.fallback is None
    assert torch.equal(steered, expected)
    assert torch.equal(plain, unsteered)
    assert hook_count(tiny_model) == hooks_before


@pytest.mark.slow  # ~2 s a case (torch.compile); the static path runs on every architecture above
@pytest.mark.parametrize("positions", POSITIONS)
@pytest.mark.parametrize(
    "arch", ["llama", "gpt2"]
)  # a 2D-mask and a 4D-mask architecture under a static cache
def test_compiled_fast_path_gives_the_plain_paths_steered_tokens(tokenizer, arch, positions):
    from conftest import build_tiny_model

    test_fast_path_gives_the_plain_paths_steered_tokens(
        build_tiny_model(arch, len(tokenizer)), tokenizer, positions, "compile"
    )


def test_generate_steered_fast_equals_plain_across_batches(tiny_llama, tokenizer):
    chats = [
        [{"role": "user", "content": text}] for text in ("Tell me a joke about cats.", "Hi", "How are you?")
    ]
    specs = [SteeringSpec(2, direction(3), 2.0, positions="response")]
    plain = generate_steered(tiny_llama, tokenizer, chats, specs, 8, temperature=0, batch_size=2, fast=False)
    fast = generate_steered(
        tiny_llama, tokenizer, chats, specs, 8, temperature=0, batch_size=2, fast=eager_compile()
    )
    static = generate_steered(
        tiny_llama, tokenizer, chats, specs, 8, temperature=0, batch_size=2, fast="static"
    )
    assert fast == plain == static


def test_auto_is_the_plain_path_on_a_cpu_and_the_compiled_one_on_cuda():
    assert fast_mode("auto", "cpu") == "off"
    assert fast_mode("auto", "cuda") == "compile"
    assert fast_mode(True, "cpu") == fast_mode(eager_compile(), "cpu") == "compile"
    assert fast_mode(False, "cuda") == "off"
    with pytest.raises(ValueError, match="fast='quick'.*Fix"):
        fast_mode("quick", "cpu")


def test_a_one_shot_generate_steered_never_compiles_by_default(tiny_llama, tokenizer, monkeypatch):
    """Callers that loop over generate_steered (sweeps, screening, the education study) would compile on every
    call on a GPU; the fast path is opt-in through an open session, which compiles once."""
    import persona.steering.fast as fast_generation

    monkeypatch.setattr(
        fast_generation, "fast_mode", lambda fast, device: "compile" if fast == "auto" else "off"
    )

    def refuse(*_args, **_kwargs):
        raise AssertionError("a session was opened for a one-shot call")

    monkeypatch.setattr(fast_generation.FastGenerator, "__init__", refuse)
    chats = [[{"role": "user", "content": "Hi"}]]
    assert len(generate_steered(tiny_llama, tokenizer, chats, (), 4, temperature=0)) == 1


def test_a_session_serves_only_the_model_it_was_opened_on(tiny_llama, tokenizer, tiny_model_dirs):
    from persona.models import load_model
    from persona.steering.fast import FastGenerator

    other = load_model(tiny_model_dirs["llama"])
    with FastGenerator(other, "static") as session, pytest.raises(ValueError, match="another model"):
        generate_steered(tiny_llama, tokenizer, [[{"role": "user", "content": "Hi"}]], (), 2, fast=session)


def test_a_new_coefficient_reuses_the_compiled_step_a_new_layer_recompiles(tiny_llama, tokenizer):
    input_ids, attention_mask = left_padded(tokenizer)
    with FastGenerator(tiny_llama, eager_compile()) as generator:
        generator.generate(input_ids, attention_mask, [SteeringSpec(2, direction(0), 1.0)], **GREEDY)
        compiled = counters["stats"]["unique_graphs"]
        for coef in (-2.0, 3.0):
            spec = SteeringSpec(2, direction(4), coef)
            assert torch.equal(
                generator.generate(input_ids, attention_mask, [spec], **GREEDY),
                plain_generate(tiny_llama, input_ids, attention_mask, [spec]),
            )
        assert counters["stats"]["unique_graphs"] == compiled
        generator.generate(input_ids, attention_mask, [SteeringSpec(1, direction(0), 1.0)], **GREEDY)
        assert counters["stats"]["unique_graphs"] == compiled + 1


def test_torch_compile_ignores_hooks_attached_after_compiling_why_a_session_compiles_its_own(
    tiny_llama, tokenizer
):
    """Pins the hazard this module exists for (torch's ``skip_nnmodule_hook_guards``, on by default): transformers'
    own compiled decode step, traced without hooks, silently ignores steering hooks attached later. A session's
    own compiled step is not fooled by it."""
    input_ids, attention_mask = left_padded(tokenizer)
    config = eager_compile()
    config._compile_all_devices = True
    spec = SteeringSpec(2, direction(5), 2.0, positions="generated")
    expected = plain_generate(tiny_llama, input_ids, attention_mask, [spec])
    static = {"cache_implementation": "static", "compile_config": config}
    unsteered = tiny_llama.generate(input_ids=input_ids, attention_mask=attention_mask, **GREEDY, **static)
    with steer(tiny_llama, [spec]):
        stale = tiny_llama.generate(input_ids=input_ids, attention_mask=attention_mask, **GREEDY, **static)
    assert torch.equal(stale, unsteered), (
        "torch.compile now sees late hooks: the session's own compile may go"
    )
    with FastGenerator(tiny_llama, eager_compile()) as generator:
        assert torch.equal(generator.generate(input_ids, attention_mask, [spec], **GREEDY), expected)
        with block_hooks(tiny_llama, [(3, lambda hidden, state: hidden * 0.5)]):  # attached mid-session
            halved = generator.generate(input_ids, attention_mask, [spec], **GREEDY)
    with steer(tiny_llama, [spec]), block_hooks(tiny_llama, [(3, lambda hidden, state: hidden * 0.5)]):
        halved_plain = tiny_llama.generate(input_ids=input_ids, attention_mask=attention_mask, **GREEDY)
    assert torch.equal(halved, halved_plain)


def test_transformers_runs_prefill_eagerly_and_compiles_decode_steps_through_get_compiled_call(
    tiny_llama, tokenizer, monkeypatch
):
    """Pins the transformers behaviour the phase under compile relies on (see ``persona.hooks.phase.cached_tokens``)
    and the method a session hands its compiled step through: every decode step, and nothing else, calls it."""
    input_ids, attention_mask = left_padded(tokenizer)
    compiled_widths, forward_widths = [], []
    real = fast_generation._compiled_call

    def spy(model, config):
        run = real(model, config)

        def counted(*args, **kwargs):
            compiled_widths.append(kwargs["input_ids"].shape[1])
            return run(*args, **kwargs)

        return counted

    monkeypatch.setattr(fast_generation, "_compiled_call", spy)
    count = [(0, lambda hidden, state: forward_widths.append(hidden.shape[1]) if not state.prefill else None)]
    with FastGenerator(tiny_llama, eager_compile()) as generator:
        generator.generate(input_ids, attention_mask, [], **GREEDY)
    with block_hooks(tiny_llama, count):
        tiny_llama.generate(input_ids=input_ids, attention_mask=attention_mask, **GREEDY)
    assert compiled_widths == forward_widths == [1] * (GREEDY["max_new_tokens"] - 1)


def test_a_failed_compile_falls_back_once_with_a_warning(tiny_llama, tokenizer, monkeypatch, caplog):
    input_ids, attention_mask = left_padded(tokenizer)
    calls = []

    def broken(model, config):
        def run(*args, **kwargs):
            calls.append(1)
            raise torch._dynamo.exc.TorchDynamoException("no compiler here")

        return run

    monkeypatch.setattr(fast_generation, "_compiled_call", broken)
    spec = SteeringSpec(2, direction(6), 1.5)
    with caplog.at_level(logging.WARNING), FastGenerator(tiny_llama, eager_compile()) as generator:
        first = generator.generate(input_ids, attention_mask, [spec], **GREEDY)
        second = generator.generate(input_ids, attention_mask, [spec], **GREEDY)
    expected = plain_generate(tiny_llama, input_ids, attention_mask, [spec])
    assert torch.equal(first, expected) and torch.equal(second, expected)
    assert len(calls) == 1
    assert "no compiler here" in generator.fallback
    assert sum("fast='static'" in record.getMessage() for record in caplog.records) == 1


def test_the_session_refuses_what_it_cannot_keep_exact(tiny_llama, tokenizer):
    input_ids, attention_mask = left_padded(tokenizer)
    generator = FastGenerator(tiny_llama, "static")
    with pytest.raises(RuntimeError, match="with-block"):
        generator.generate(input_ids, attention_mask)
    with generator, pytest.raises(ValueError, match="prefill_chunk_size.*Fix"):
        generator.generate(input_ids, attention_mask, prefill_chunk_size=2, **GREEDY)
    with pytest.raises(ValueError, match="Fix: call generate_steered"):
        FastGenerator(tiny_llama, False)


def test_static_cache_masks_need_the_callers_prompt_mask_for_prompt_positions(tiny_model, tokenizer):
    """A static cache makes transformers pass 4D (or per-type dict) masks: each row's prompt tokens come from the
    2D prompt mask of the caller, checked against the forward's shape, never guessed from the 4D mask."""
    input_ids, attention_mask = left_padded(tokenizer)
    spec = SteeringSpec(2, direction(7), 1.5, positions="prompt")
    expected = plain_generate(tiny_model, input_ids, attention_mask, [spec])
    static = {"cache_implementation": "static", "disable_compile": True}
    with pytest.raises(ValueError, match="prompt_mask"), steer(tiny_model, [spec]):
        tiny_model.generate(input_ids=input_ids, attention_mask=attention_mask, **GREEDY, **static)
    state = ForwardState(prompt_mask=attention_mask)
    with steer(tiny_model, [spec], state=state):
        assert torch.equal(
            tiny_model.generate(input_ids=input_ids, attention_mask=attention_mask, **GREEDY, **static),
            expected,
        )
        with pytest.raises(ValueError, match=r"prompt mask is \[3, \d+\], the forward \[6, \d+\]"):
            tiny_model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                num_beams=2,
                num_return_sequences=2,
                **GREEDY,
                **static,
            )


def test_a_peft_wrapped_model_uses_the_session_compile(tiny_llama, tokenizer):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        tiny_llama, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    model.eval()
    input_ids, attention_mask = left_padded(tokenizer)
    spec = SteeringSpec(2, direction(8), 1.5)
    expected = plain_generate(model, input_ids, attention_mask, [spec])
    with FastGenerator(model, eager_compile()) as generator:
        assert torch.equal(generator.generate(input_ids, attention_mask, [spec], **GREEDY), expected)
        assert generator.fallback is None
    assert "get_compiled_call" not in tiny_llama.__dict__


@pytest.mark.gpu
@pytest.mark.parametrize("positions", POSITIONS)
@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # a 2D-mask and a 4D-mask architecture; all five on CPU
def test_cuda_inductor_fast_path_gives_the_plain_paths_tokens(tokenizer, arch, positions):
    """On a GPU: inductor with CUDA graphs (``reduce-overhead``, what ``fast="auto"`` runs), float32 without TF32."""
    from conftest import build_tiny_model

    torch.backends.cuda.matmul.allow_tf32 = False
    model = build_tiny_model(arch, len(tokenizer)).to("cuda")
    input_ids, attention_mask = (tensor.to("cuda") for tensor in left_padded(tokenizer))
    specs = specs_for(positions)
    expected = plain_generate(model, input_ids, attention_mask, specs)
    with FastGenerator(model, "auto") as generator:
        assert generator.mode == "compile"
        steered = generator.generate(input_ids, attention_mask, specs, **GREEDY)
        again = generator.generate(input_ids, attention_mask, specs, **GREEDY)  # replayed graphs
        assert generator.fallback is None
    assert torch.equal(steered, expected) and torch.equal(again, expected)
