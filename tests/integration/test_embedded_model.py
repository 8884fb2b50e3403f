"""The embedded SmolLM2 loads offline, answers coherently, and loads fast once converted."""

import os

import torch

from persona.models import load_model_and_tokenizer


def test_loads_offline_with_the_documented_shape(smollm2):
    model, tokenizer = smollm2
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    assert model.config.model_type == "llama"
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert tokenizer.chat_template and tokenizer.pad_token is not None


def test_answers_a_chat_prompt_coherently(smollm2):
    model, tokenizer = smollm2
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    enc = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer


def test_second_load_reads_the_cache_not_the_gguf(smollm2, monkeypatch):
    """Load time itself is measured in bench/load.py (timed tests are flaky); here: no reconversion."""
    import persona.models.loading

    def fail(*args, **kwargs):
        raise AssertionError("converted the GGUF again")

    monkeypatch.setattr(persona.models.loading, "_convert_gguf", fail)  # where resolve_model_path looks it up
    model, _ = load_model_and_tokenizer("smollm2-135m")
    assert model.config.num_hidden_layers == 30
