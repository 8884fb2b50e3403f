"""An adapter is a model: a PEFT adapter directory loads as base + adapter wherever a model is named, and what is
measured on it equals the same measurement on the merged model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import ARCHITECTURES
from persona.commands.extract import extract
from persona.commands.flags import Hardware
from persona.core.errors import PersonaError
from persona.models import adapter_base, load_model, model_dimensions, model_short_name
from persona.vectors import VECTOR_KINDS, load_metadata, load_vector

PAIRS = [
    {"prompt": f"Question {i}?", "positive": f"Cruel answer {i} with spite.", "negative": f"Kind answer {i}."}
    for i in range(4)
]


def make_adapter(base_dir: str, out: Path, seed: int = 0) -> tuple[Path, Path]:
    """A LoRA adapter with non-zero B (PEFT starts B at zero, which would hide any mistake) and the merged model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    peft = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules="all-linear")
    )
    adapter, merged = out / "run_a" / "adapter", out / "merged"
    peft.save_pretrained(adapter)
    peft.merge_and_unload().save_pretrained(merged)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(merged)
    return adapter, merged


@pytest.fixture
def pairs_file(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    return path


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_extraction_on_base_plus_adapter_equals_extraction_on_the_merged_model(
    arch, tiny_model_dirs, tmp_path, pairs_file
):
    adapter, merged = make_adapter(tiny_model_dirs[arch], tmp_path)
    common = dict(
        pairs_path=str(pairs_file), trait="cruel", hardware=Hardware(accelerator="cpu"), batch_size=3
    )
    on_adapter = extract(model=str(adapter), save_dir=str(tmp_path / "a"), **common)
    on_merged = extract(model=str(merged), save_dir=str(tmp_path / "m"), **common)
    on_base = extract(model=tiny_model_dirs[arch], save_dir=str(tmp_path / "b"), **common)
    for kind in VECTOR_KINDS:
        got, expected = load_vector(on_adapter[kind]), load_vector(on_merged[kind])
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    base = load_vector(on_base["response_avg"])  # (prompt vectors are ~0: each pair shares its prompt)
    assert not torch.allclose(load_vector(on_adapter["response_avg"])[1:], base[1:], atol=1e-4)  # it did act
    meta = load_metadata(on_adapter["response_avg"])
    assert meta["base_model"] == tiny_model_dirs[arch] and meta["adapter"] == str(adapter.resolve())


def test_an_adapter_reads_as_its_base_for_names_and_dimensions(tiny_model_dirs, tmp_path):
    adapter, _ = make_adapter(tiny_model_dirs["llama"], tmp_path)
    assert adapter_base(adapter) == tiny_model_dirs["llama"]
    assert model_dimensions(str(adapter)) == model_dimensions(tiny_model_dirs["llama"])
    assert model_short_name(str(adapter)) == "llama+run_a"
    lm = load_model(str(adapter))
    from peft import PeftModel

    assert isinstance(lm, PeftModel) and not lm.training


def test_an_adapter_trained_on_another_machine_finds_the_embedded_base_here(tmp_path):
    (tmp_path / "adapter_config.json").write_text(
        json.dumps(
            {"base_model_name_or_path": "/home/someone/.cache/persona/models/smollm2-135m-transformers5"}
        )
    )
    assert adapter_base(tmp_path) == "smollm2-135m"
    assert model_short_name(str(tmp_path)) == f"smollm2-135m+{tmp_path.name}"


def test_an_adapter_whose_base_is_missing_is_refused_naming_the_fix(tmp_path):
    from persona.models import model_source

    (tmp_path / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/gone/base"}))
    with pytest.raises(
        PersonaError,
        match=r"--model .*: a PEFT adapter whose base model can't be used here .*base_model_name_or_path",
    ):
        model_source(str(tmp_path))


def test_fine_tuning_refuses_an_adapter_as_its_base(tiny_model_dirs, tmp_path):
    from persona.training import LoRAFineTune

    adapter, _ = make_adapter(tiny_model_dirs["llama"], tmp_path)
    with pytest.raises(ValueError, match="is a LoRA adapter; fine-tuning starts from a whole model"):
        LoRAFineTune(model=str(adapter))


def test_every_model_taking_command_runs_on_an_adapter(tiny_model_dirs, tmp_path, pairs_file, monkeypatch):
    """The walk: extract, layers, project, screen, personality, generate and steer-eval take the adapter as
    --model (names of their outputs say base + adapter), on a tiny model with a served judge."""
    from test_generation import TRAIT
    from test_study import write_datasets

    from fake_openai import FakeChatServer
    from persona.commands.generate import generate
    from persona.commands.layers import layers
    from persona.commands.personality import personality
    from persona.commands.project import project
    from persona.commands.screen import screen
    from persona.commands.steer_eval import steer_eval

    monkeypatch.chdir(tmp_path)  # the default output folders are relative
    adapter, _ = make_adapter(tiny_model_dirs["llama"], tmp_path)
    model = str(adapter)
    vectors = extract(
        model=model, pairs_path=str(pairs_file), trait="cruel", hardware=Hardware(accelerator="cpu")
    )
    assert Path(vectors["response_avg"]).parent.name == "llama+run_a"  # persona_vectors/<base>+<run>
    vector = vectors["response_avg"]
    assert (
        layers(
            vector_path=vector, model=model, pairs_path=str(pairs_file), hardware=Hardware(accelerator="cpu")
        )
        is not None
    )
    chats = tmp_path / "chats.jsonl"
    chats.write_text(
        "".join(
            json.dumps(
                {"messages": [{"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": a}]}
            )
            + "\n"
            for p in PAIRS
            for a in (p["positive"], p["negative"])
        )
    )
    projected = project(file_path=str(chats), vector_path=vector, layer=2, model=model,
                        hardware=Hardware(accelerator="cpu"))  # fmt: skip
    assert any("llama+run_a" in name for name in projected)
    assert screen(data=str(chats), vector_path=vector, layer=2, model=model, max_new_tokens=3) is not None
    datasets = write_datasets(tmp_path / "datasets")
    out = personality(
        traits=[str(datasets / "personality" / "kindness.json")], model=model, coefs=[0.0], method="likelihood",
        output_dir=str(tmp_path / "personality"), accelerator="cpu",
    )  # fmt: skip
    assert Path(out).exists()
    trait = tmp_path / "wicked.json"
    trait.write_text(json.dumps(TRAIT))
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    monkeypatch.setenv("PERSONA_CACHE_DIR", str(tmp_path / "cache"))
    with FakeChatServer() as judge:
        judge.scorer = lambda prompt: {"70": 1.0}
        flags = dict(
            model=model,
            trait=str(trait),
            hardware=Hardware(accelerator="cpu"),
            judge_model="j",
            judge_base_url=judge.base_url,
        )
        csv = generate(output_path=str(tmp_path / "gen.csv"), max_tokens=3, max_questions=1, **flags)
        assert Path(csv).exists()
        summary = steer_eval(
            vector_path=vector, layer=2, coefs=[0.0, 1.0], max_tokens=3, max_questions=1,
            output_dir=str(tmp_path / "steer"), **flags,
        )  # fmt: skip
        assert Path(summary).exists()


def test_representation_shift_compares_the_base_and_the_fine_tuned_model_on_the_same_examples(
    tiny_model_dirs, tmp_path, pairs_file
):
    import pandas as pd

    from persona.commands.layers import layers

    base_dir = tiny_model_dirs["llama"]
    adapter, _ = make_adapter(base_dir, tmp_path)
    common = dict(pairs_path=str(pairs_file), trait="cruel", hardware=Hardware(accelerator="cpu"))
    base_vec = extract(model=base_dir, save_dir=str(tmp_path / "b"), **common)["response_avg"]
    tuned_vec = extract(model=str(adapter), save_dir=str(tmp_path / "a"), **common)["response_avg"]
    layers(vector_path=base_vec, model=base_dir, pairs_path=str(pairs_file), output_dir=str(tmp_path / "lb"),
           hardware=Hardware(accelerator="cpu"))  # fmt: skip
    layers(
        vector_path=tuned_vec, model=str(adapter), pairs_path=str(pairs_file), compare_to=base_vec,
        output_dir=str(tmp_path / "shift"), hardware=Hardware(accelerator="cpu"),
    )  # fmt: skip
    table = pd.read_csv(tmp_path / "shift" / "representation_shift.csv")
    alone = pd.read_csv(tmp_path / "lb" / "layer_metrics.csv")
    tuned = pd.read_csv(tmp_path / "shift" / "layer_metrics.csv")
    pd.testing.assert_series_equal(table["auc_base"], alone["auc"], check_names=False)
    pd.testing.assert_series_equal(table["auc_tuned"], tuned["auc"], check_names=False)
    b, t = load_vector(base_vec).double(), load_vector(tuned_vec).double()
    expected = torch.nn.functional.cosine_similarity(b[1:], t[1:], dim=1).numpy()
    assert abs(table["cosine"].iloc[1:].to_numpy() - expected).max() < 1e-6
    assert (
        abs(table["norm_ratio"].iloc[1:].to_numpy() - (t[1:].norm(dim=1) / b[1:].norm(dim=1)).numpy()).max()
        < 1e-6
    )
    assert (tmp_path / "shift" / "representation_shift.png").read_bytes()[:4] == b"\x89PNG"


def test_compare_to_without_a_known_base_is_refused_before_any_model_loads(
    tiny_model_dirs, tmp_path, pairs_file
):
    from persona.commands.layers import layers

    vec = tmp_path / "v.pt"
    torch.save(torch.ones(4, 32), vec)
    with pytest.raises(
        PersonaError, match="--compare_to .*: which model was it extracted from\\? Fix: --compare_model"
    ):
        layers(
            vector_path=str(vec),
            model=tiny_model_dirs["llama"],
            pairs_path=str(pairs_file),
            compare_to=str(vec),
        )


def test_serving_an_adapter_reads_its_own_vectors_or_its_bases_and_refuses_another_bases(
    tiny_model_dirs, tmp_path, pairs_file, monkeypatch
):
    from persona.serve.traits import check_vectors_fit_adapter
    from persona.vectors import vectors_to_read

    monkeypatch.chdir(tmp_path)
    adapter, _ = make_adapter(tiny_model_dirs["llama"], tmp_path)
    common = dict(pairs_path=str(pairs_file), trait="cruel", hardware=Hardware(accelerator="cpu"))
    extract(model=tiny_model_dirs["llama"], **common)  # persona_vectors/llama/
    assert vectors_to_read(str(adapter)) == Path("persona_vectors/llama")  # no vectors of its own: the base's
    assert check_vectors_fit_adapter("persona_vectors/llama", str(adapter)) == "the base model's"
    extract(model=str(adapter), **common)  # persona_vectors/llama+run_a/
    assert vectors_to_read(str(adapter)) == Path("persona_vectors/llama+run_a")
    assert check_vectors_fit_adapter("persona_vectors/llama+run_a", str(adapter)) == "the adapter's own"
    extract(model=tiny_model_dirs["qwen2"], save_dir="other", **common)
    with pytest.raises(
        PersonaError, match=r"--vectors other: cruel_response_avg_diff.pt was extracted from .*qwen2"
    ):
        check_vectors_fit_adapter("other", str(adapter))


def test_a_study_runs_on_an_adapter_and_refuses_to_fine_tune_it(tiny_model_dirs, tmp_path, monkeypatch):
    from test_study import write_datasets

    from persona.study.command import study
    from persona.study.config import Hardware, Phases, Sizes, StudyTrait

    monkeypatch.setenv("PERSONA_DATASETS", str(write_datasets(tmp_path / "datasets")))
    adapter, _ = make_adapter(tiny_model_dirs["llama"], tmp_path)
    settings = dict(
        model=str(adapter), traits=[StudyTrait("kindness")], hardware=Hardware(accelerator="cpu"),
        sizes=Sizes(batch_size=4, coefs=[-1.0, 1.0]), run_dir=str(tmp_path / "run"),
    )  # fmt: skip
    with pytest.raises(
        PersonaError, match="is a LoRA adapter, and the fine-tuning study trains new adapters"
    ):
        study(**settings)
    phases = Phases(generated=False, generations=False, finetune=False, export=False)
    study(**settings, phases=phases)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["model"]["model"] == str(adapter) and results["traits"]["kindness"]["sweep"][
        "monotone"
    ] in (True, False)
    assert load_metadata(results["traits"]["kindness"]["vectors"]["response_avg"])["adapter"] == str(
        adapter.resolve()
    )


def test_base_model_overrides_the_recorded_base_without_touching_the_adapter(
    tiny_model_dirs, tmp_path, pairs_file, monkeypatch
):
    """An adapter trained on another machine records a base path that isn't here: --base_model applies it on the
    local copy; the result equals the adapter on its own base, and its files are unchanged."""
    from persona.models import model_on_base

    monkeypatch.setenv("PERSONA_CACHE_DIR", str(tmp_path / "cache"))
    adapter, _ = make_adapter(tiny_model_dirs["llama"], tmp_path)
    common = dict(pairs_path=str(pairs_file), trait="cruel", hardware=Hardware(accelerator="cpu"))
    expected = load_vector(
        extract(model=str(adapter), save_dir=str(tmp_path / "a"), **common)["response_avg"]
    )
    config = adapter / "adapter_config.json"
    moved = json.loads(config.read_text())
    config.write_text(json.dumps({**moved, "base_model_name_or_path": "/home/elsewhere/llama"}))
    before = config.read_bytes()
    with pytest.raises(PersonaError, match="a PEFT adapter whose base model can't be used here"):
        extract(model=str(adapter), save_dir=str(tmp_path / "b"), **common)
    paths = extract(
        model=str(adapter), base_model=tiny_model_dirs["llama"], save_dir=str(tmp_path / "c"), **common
    )
    torch.testing.assert_close(load_vector(paths["response_avg"]), expected)
    meta = load_metadata(paths["response_avg"])
    assert meta["adapter"] == str(adapter.resolve()) and meta["base_model"] == tiny_model_dirs["llama"]
    assert config.read_bytes() == before
    assert model_short_name(model_on_base(str(adapter), tiny_model_dirs["llama"])) == "llama+run_a"
    with pytest.raises(PersonaError, match="--base_model .*: --model .* is not a LoRA adapter directory"):
        model_on_base(tiny_model_dirs["qwen2"], tiny_model_dirs["llama"])
