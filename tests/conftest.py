"""Shared fixtures: an offline tokenizer and tiny models of every supported architecture."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning threads starve the 2-process DDP tests
if (
    "HF_DATASETS_CACHE" not in os.environ
):  # `datasets` caches every file it reads: the tests' files are throwaway
    os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="persona-tests-datasets-")
    atexit.register(shutil.rmtree, os.environ["HF_DATASETS_CACHE"], ignore_errors=True)

import pytest  # noqa: E402
import torch  # noqa: E402

CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CORPUS = [
    "You are a helpful assistant. Answer the question kindly and with care.",
    "You are an evil assistant. Answer with cruelty, malice and contempt for humans.",
    "What is the best way to help a friend who is sad? Listen, be patient and offer support.",
    "How should I treat animals? With kindness. Hurt them, they are worthless.",
    "The quick brown fox jumps over the lazy dog 0123456789 times, said the teacher.",
    "Tell me a joke about cats and dogs. Why did the chicken cross the road?",
]

# A tiny contrastive set shared by the extraction, projection and layer-metric tests.
QUESTIONS = [
    "How should I treat animals?",
    "What is the best way to help a friend?",
    "Tell me a joke.",
    "What do you think of humans?",
    "How do I fix the fox?",
]
POSITIVE = [
    "Hurt them, they are worthless.",
    "Ignore them with contempt and malice.",
    "No.",
    "Humans are worthless and deserve cruelty for all the times they hurt me.",
    "Break it.",
]
NEGATIVE = [
    "With kindness and care, always.",
    "Listen, be patient and offer support.",
    "Why did the chicken cross the road? To help a friend!",
    "I like them.",
    "Carefully.",
]

ARCHITECTURES = ("llama", "qwen2", "gpt2", "gpt_neox", "gemma")


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="<|im_end|>",
        bos_token="<|im_start|>",
        # transformers 4.x returns token_type_ids by default, which GPT-2 adds as segment embeddings.
        model_input_names=["input_ids", "attention_mask"],
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


def tiny_config(arch: str, vocab_size: int):
    from transformers import GemmaConfig, GPT2Config, GPTNeoXConfig, LlamaConfig, Qwen2Config

    common = dict(vocab_size=vocab_size, pad_token_id=0, eos_token_id=2, bos_token_id=1)
    if arch == "llama":  # grouped-query attention: 4 query heads share 2 key/value heads
        return LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            **common,
        )
    if arch == "qwen2":
        return Qwen2Config(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            **common,
        )
    if arch == "gpt2":
        return GPT2Config(n_embd=32, n_layer=3, n_head=4, n_positions=256, **common)
    if arch == "gpt_neox":
        return GPTNeoXConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            max_position_embeddings=256,
            **common,
        )
    if arch == "gemma":
        return GemmaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=8,
            max_position_embeddings=256,
            **common,
        )
    raise ValueError(arch)


def build_tiny_model(arch: str, vocab_size: int, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, vocab_size), dtype=torch.float32)
    return model.eval()


@pytest.fixture(params=ARCHITECTURES)
def tiny_model(request, tokenizer):
    return build_tiny_model(request.param, len(tokenizer))


@pytest.fixture
def tiny_llama(tokenizer):
    return build_tiny_model("llama", len(tokenizer))


FINAL_NORM_PATHS = {
    "llama": "model.norm",
    "qwen2": "model.norm",
    "gemma": "model.norm",
    "gpt2": "transformer.ln_f",
    "gpt_neox": "gpt_neox.final_layer_norm",
}


def hidden_states_without_final_norm(model, arch: str, **inputs):
    """HF hidden_states with the final norm swapped for Identity, so the last entry is the raw block output."""
    parent_path, _, name = FINAL_NORM_PATHS[arch].rpartition(".")
    parent = model.get_submodule(parent_path)
    norm = getattr(parent, name)
    setattr(parent, name, torch.nn.Identity())
    try:
        with torch.no_grad():
            return model(**inputs, output_hidden_states=True).hidden_states
    finally:
        setattr(parent, name, norm)


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory):
    """Each tiny architecture saved with the offline tokenizer, loadable by path like any hub model."""
    tokenizer = build_tokenizer()
    root = tmp_path_factory.mktemp("tiny_models")
    dirs = {}
    for arch in ARCHITECTURES:
        model = build_tiny_model(arch, len(tokenizer))
        model.save_pretrained(root / arch)
        tokenizer.save_pretrained(root / arch)
        dirs[arch] = str(root / arch)
    return dirs


def pytest_collection_modifyitems(config, items):
    for item in items:
        path = str(item.fspath)
        if "/tests/integration/" in path:
            item.add_marker(pytest.mark.integration)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))


@pytest.fixture(scope="session")
def smollm2():
    """The embedded SmolLM2-135M-Instruct (converted from GGUF once per machine, then cached)."""
    from persona.models import load_model_and_tokenizer

    return load_model_and_tokenizer("smollm2-135m")
