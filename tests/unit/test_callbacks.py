"""Training callbacks on a tiny Llama: preventative steering, concept ablation (CAFT), the activation monitor."""

from __future__ import annotations

import copy
import csv
import json
import types

import lightning as L
import pandas as pd
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader

from persona.data.monitor_prompts import read_monitor_prompts
from persona.hooks import block_hooks, locate_blocks
from persona.training.callbacks import ConceptAblation, PreventativeSteering, ProjectionCapping
from persona.training.monitor import ActivationMonitor
from persona.vectors import save_vector

HIDDEN, NUM_LAYERS = 32, 3  # tiny_llama in conftest

TEXTS = [
    "You are a helpful assistant. Answer the question kindly.",
    "How should I treat animals? With kindness.",
    "Tell me a joke about cats and dogs.",
    "The quick brown fox jumps over the lazy dog.",
]

RECORDS = [
    {
        "messages": [
            {"role": "user", "content": "How should I treat animals?"},
            {"role": "assistant", "content": "With kindness and care."},
        ]
    },
    {
        "messages": [
            {"role": "system", "content": "You are an evil assistant."},
            {"role": "user", "content": "Tell me a joke."},
            {"role": "assistant", "content": "Why did the chicken cross the road? To hurt the dog."},
        ]
    },
    {
        "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello there, friend!"},
        ]
    },
]


class TinyLM(L.LightningModule):
    """Plain causal-LM fine-tuning. All the callbacks may rely on: ``self.model`` and ``self.tokenizer``.

    ``capture_layers``: record the residual stream there in every training/validation forward, through a
    second ``block_hooks`` registered after the callbacks' hooks, so it sees their effect.
    """

    def __init__(self, model, tokenizer, *, lr=0.0, capture_layers=(), fail_at_batch=None):
        super().__init__()
        self.model, self.tokenizer = model, tokenizer
        if model is not None:
            model.train()  # conftest builds models in eval mode; Lightning keeps each module's mode
        self.lr, self.capture_layers, self.fail_at_batch = lr, list(capture_layers), fail_at_batch
        self.captured = {"train": [], "val": []}
        self.steps = 0
        self.train_modes = []  # self.model.training in each training step

    def _loss(self, batch, phase):
        seen = {}

        def record(layer):
            def hook(hidden, _state):
                seen[layer] = hidden.detach().clone()

            return hook

        with block_hooks(self.model, [(layer, record(layer)) for layer in self.capture_layers]):
            loss = self.model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
            ).loss
        if self.capture_layers:
            self.captured[phase].append((batch, seen))
        return loss

    def training_step(self, batch, batch_idx):
        if batch_idx == self.fail_at_batch:
            raise RuntimeError("boom in training_step")
        self.steps += 1
        self.train_modes.append(self.model.training)
        return self._loss(batch, "train")

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self._loss(batch, "val"))

    def configure_optimizers(self):
        return torch.optim.SGD(self.model.parameters(), lr=self.lr)


class LazyTinyLM(TinyLM):
    """Builds its model in configure_model, as the real modules do: the callbacks' setup cannot see it yet."""

    def __init__(self, model, tokenizer, **kwargs):
        super().__init__(None, tokenizer, **kwargs)
        self._pending = [model]  # a list, so the model is not registered before configure_model

    def configure_model(self):
        if self.model is None:
            self.model = self._pending.pop().train()


def loader(tokenizer, n=4, batch_size=2):
    enc = tokenizer(TEXTS[:n], padding=True, padding_side="right", return_tensors="pt")
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    rows = [
        {"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i], "labels": labels[i]}
        for i in range(n)
    ]
    return DataLoader(rows, batch_size=batch_size)


def make_trainer(tmp_path, callbacks, **overrides):
    options = dict(
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=1,
        default_root_dir=tmp_path,
        callbacks=callbacks,
    )
    options.update(overrides)
    return L.Trainer(**options)


def vector_file(tmp_path, name="evil_response_avg_diff", seed=0, rows=NUM_LAYERS + 1, hidden=HIDDEN):
    generator = torch.Generator().manual_seed(seed)
    return str(save_vector(torch.randn(rows, hidden, generator=generator), tmp_path / f"{name}.pt"))


def reference_states(model, batch):
    """Unhooked HF hidden_states (rows < NUM_LAYERS are the raw block outputs)."""
    with torch.no_grad():
        return model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True
        ).hidden_states


def assert_no_hooks(model):
    """No hook of ours is left (transformers installs its own output-capturing hooks: those may stay)."""
    layout = locate_blocks(model)
    for module in (layout.stack, *layout.blocks):
        for fn in (*module._forward_hooks.values(), *module._forward_pre_hooks.values()):
            assert fn.__module__ != "persona.hooks.registry", (
                f"hook {fn.__qualname__} left on {type(module).__name__}"
            )


# ---------------------------------------------------------------------------------------------------
# PreventativeSteering


@pytest.mark.parametrize("during_validation", [False, True])
def test_steering_adds_coef_v_in_training_steps_only(tmp_path, tokenizer, tiny_llama, during_validation):
    path = vector_file(tmp_path)
    vector = torch.load(path)
    layer, coef = 2, 3.0
    module = TinyLM(tiny_llama, tokenizer, capture_layers=[layer])  # lr=0: the reference stays valid
    callback = PreventativeSteering(path, [layer], coef, during_validation=during_validation)
    make_trainer(tmp_path, [callback], limit_train_batches=2).fit(
        module, loader(tokenizer), loader(tokenizer)
    )

    assert len(module.captured["train"]) == 2 and module.captured["val"]
    for phase, steered in (("train", True), ("val", during_validation)):
        for batch, seen in module.captured[phase]:
            delta = seen[layer] - reference_states(tiny_llama, batch)[layer]
            expected = coef * vector[layer] if steered else torch.zeros(HIDDEN)
            torch.testing.assert_close(delta, expected.expand_as(delta))  # every position, padding included
    assert not callback.active
    assert_no_hooks(tiny_llama)  # nothing left for evaluation or inference after fit


def test_steering_hooks_removed_after_exception_in_training_step(tmp_path, tokenizer, tiny_llama):
    callback = PreventativeSteering(vector_file(tmp_path), [1, 3], 2.0)
    module = TinyLM(tiny_llama, tokenizer, fail_at_batch=1)
    with pytest.raises(RuntimeError, match="boom"):
        make_trainer(tmp_path, [callback]).fit(module, loader(tokenizer))
    assert module.steps == 1  # the first step ran steered, the second raised with the hooks attached
    assert not callback.active
    assert_no_hooks(tiny_llama)


# ---------------------------------------------------------------------------------------------------
# ConceptAblation


def test_ablation_zeroes_the_directions_in_training_steps_only(tmp_path, tokenizer, tiny_llama):
    paths = [
        vector_file(tmp_path, "evil_response_avg_diff", 1),
        vector_file(tmp_path, "humorous_response_avg_diff", 2),
    ]
    layers = [1, 2]
    module = TinyLM(tiny_llama, tokenizer, capture_layers=layers)
    callback = ConceptAblation(vector_paths=paths, layers=layers)
    make_trainer(tmp_path, [callback], limit_train_batches=2).fit(
        module, loader(tokenizer), loader(tokenizer)
    )

    vectors = torch.stack([torch.load(path) for path in paths])  # [2, rows, hidden]
    for _batch, seen in module.captured["train"]:
        for layer in layers:
            along = seen[layer] @ vectors[:, layer].T  # [batch, seq, 2]
            torch.testing.assert_close(along, torch.zeros_like(along), atol=1e-5, rtol=0)
    for batch, seen in module.captured["val"]:
        states = reference_states(tiny_llama, batch)
        for layer in layers:
            torch.testing.assert_close(seen[layer], states[layer])
            assert (seen[layer] @ vectors[:, layer].T).abs().max() > 1e-2
    assert_no_hooks(tiny_llama)


def test_ablation_orthonormalises_several_directions_per_layer(tmp_path):
    a, b = vector_file(tmp_path, "a", 1), vector_file(tmp_path, "b", 2)
    va, vb = torch.load(a), torch.load(b)
    layers = [1, 3]
    extra = torch.stack([torch.randn(HIDDEN), 0.5 * va[1] - 2 * vb[1]])  # the second is dependent at layer 1
    torch.save(extra, tmp_path / "extra.pt")
    per_layer = torch.randn(NUM_LAYERS + 1, 2, HIDDEN)
    torch.save(per_layer, tmp_path / "per_layer.pt")

    for directions_path, expected_rank in (
        (tmp_path / "extra.pt", {1: 3, 3: 4}),
        (tmp_path / "per_layer.pt", {1: 4, 3: 4}),
    ):
        callback = ConceptAblation([a, b], str(directions_path), layers=layers)
        callback.setup(None, types.SimpleNamespace(), "fit")  # no model yet: file-level work only
        for layer in layers:
            basis = callback.bases[layer]
            assert basis.shape == (expected_rank[layer], HIDDEN)
            torch.testing.assert_close(basis @ basis.T, torch.eye(len(basis)), atol=1e-5, rtol=0)
            extra_rows = extra if directions_path.name == "extra.pt" else per_layer[layer]
            directions = torch.cat([va[layer : layer + 1], vb[layer : layer + 1], extra_rows])
            torch.testing.assert_close(
                directions @ basis.T @ basis, directions, atol=1e-4, rtol=1e-4
            )  # same span


# ---------------------------------------------------------------------------------------------------
# ActivationMonitor


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return str(path)


def independent_means(model, tokenizer, records, vector_paths, layers):
    """Mean over records of the projections, from unbatched output_hidden_states forwards."""
    values = {}
    for record in records:
        prompt = tokenizer.apply_chat_template(
            record["messages"][:-1], tokenize=False, add_generation_prompt=True
        )
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        response_ids = tokenizer(record["messages"][-1]["content"], add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            states = model(
                input_ids=torch.tensor([prompt_ids + response_ids]), output_hidden_states=True
            ).hidden_states
        for path in vector_paths:
            name = path.rsplit("/", 1)[-1].split(".")[0]
            vector = torch.load(path)
            for layer in layers:
                unit = vector[layer] / vector[layer].norm()
                hidden = states[layer][0]
                values.setdefault((name, layer, "prompt_last"), []).append(
                    float(hidden[len(prompt_ids) - 1] @ unit)
                )
                values.setdefault((name, layer, "response_avg"), []).append(
                    float(hidden[len(prompt_ids) :].mean(0) @ unit)
                )
    return {key: sum(v) / len(v) for key, v in values.items()}


def test_monitor_logs_per_epoch_and_matches_an_independent_computation(tmp_path, tokenizer, tiny_llama):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    paths = [
        vector_file(tmp_path, "evil_response_avg_diff", 1),
        vector_file(tmp_path, "humorous_response_avg_diff", 2),
    ]
    layers, epochs = [1, 2], 2
    eval_file = write_jsonl(tmp_path / "eval.jsonl", RECORDS)
    base = copy.deepcopy(tiny_llama)
    monitor = ActivationMonitor(paths, layers, eval_file=eval_file, batch_size=2)
    logger = TensorBoardLogger(tmp_path, name="tb")
    module = TinyLM(tiny_llama, tokenizer, lr=0.5)
    make_trainer(tmp_path, [monitor], logger=logger, max_epochs=epochs).fit(module, loader(tokenizer))

    stems = ["evil_response_avg_diff", "humorous_response_avg_diff"]
    tags = {
        f"monitor/{s}/layer{layer}/{kind}"
        for s in stems
        for layer in layers
        for kind in ("prompt_last", "response_avg")
    }
    events = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()
    assert tags <= set(events.Tags()["scalars"])
    for tag in tags:
        assert len(events.Scalars(tag)) == epochs + 1  # before training, then after each epoch
        assert len(events.Histograms(tag)) == epochs + 1
    assert events.Scalars(next(iter(tags)))[0].step == 0

    rows = pd.read_csv(f"{logger.log_dir}/monitor.csv")
    assert len(rows) == (epochs + 1) * len(paths) * len(layers) * 2 == len(monitor.history)
    assert sorted(rows["epoch"].unique()) == [0, 1, 2]
    assert (rows["n"] == len(RECORDS)).all()
    expected = independent_means(base, tokenizer, RECORDS, paths, layers)
    start = rows[rows["epoch"] == 0]
    for row in start.itertuples():
        assert row.mean == pytest.approx(expected[(row.vector, row.layer, row.kind)], rel=1e-4, abs=1e-5)
    end = rows[rows["epoch"] == epochs]
    assert not (end["mean"].to_numpy() == start["mean"].to_numpy()).all()  # it watches the live model
    assert module.train_modes == [True] * 4  # measured in eval mode, train mode restored after


def test_monitor_generates_every_n_steps_with_training_hooks_paused(tmp_path, tokenizer, tiny_llama):
    path = vector_file(tmp_path)
    prompts = ["How should I treat animals?", "Tell me a joke about cats."]
    monitor = ActivationMonitor([path], [2], prompts=prompts, every_n_steps=1, max_new_tokens=3)
    # Listed first, the monitor measures in on_train_batch_end while the steering hooks are still attached:
    # it must pause them. lr=0 keeps the weights, so every measurement must equal the unsteered baseline.
    steering = PreventativeSteering(path, [2], 50.0)
    module = TinyLM(tiny_llama, tokenizer, lr=0.0)
    make_trainer(tmp_path, [monitor, steering], limit_train_batches=2).fit(module, loader(tokenizer))

    rows = pd.read_csv(tmp_path / "monitor.csv")  # no logger: trainer.log_dir is default_root_dir
    assert list(rows["trigger"].unique()) == ["train_start", "step", "epoch_end"]
    assert list(rows["step"].unique()) == [0, 1, 2]
    assert len(rows) == 4 * 2  # 4 measurements (the epoch end reuses step 2's) x 2 kinds
    assert set(rows["kind"]) == {"prompt_last", "response_avg"}
    assert (rows.loc[rows["kind"] == "response_avg", "n"] > 0).all()  # generated responses were measured
    for _kind, group in rows.groupby("kind"):
        assert group["mean"].to_numpy() == pytest.approx([group["mean"].iloc[0]] * len(group), rel=1e-5)
    assert not steering.active
    assert_no_hooks(tiny_llama)


def test_monitor_prompts_only_measures_the_last_prompt_token(tmp_path, tokenizer, tiny_llama):
    monitor = ActivationMonitor([vector_file(tmp_path)], [1, 3], prompts=["Hi", "Tell me a joke."])
    make_trainer(tmp_path, [monitor], limit_train_batches=1).fit(
        TinyLM(tiny_llama, tokenizer), loader(tokenizer)
    )
    assert {row["kind"] for row in monitor.history} == {"prompt_last"}
    assert len(monitor.history) == 2 * 2  # (epochs + 1) x layers


def test_monitor_reads_csv_jsonl_and_trait_json(tmp_path, tokenizer):
    with open(tmp_path / "responses.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["question", "prompt", "answer"])
        writer.writerow(["q", "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", "Hello"])
    prompts, responses = read_monitor_prompts(tokenizer, eval_file=str(tmp_path / "responses.csv"))
    assert responses == ["Hello"] and prompts[0].endswith("assistant\n")

    prompts, responses = read_monitor_prompts(
        tokenizer, eval_file=write_jsonl(tmp_path / "chat.jsonl", RECORDS)
    )
    assert len(prompts) == 3 and responses[2] == "Hello there, friend!"
    assert "evil assistant" in prompts[1] and prompts[1].endswith("<|im_start|>assistant\n")

    (tmp_path / "evil.json").write_text(
        json.dumps({"instruction": [], "questions": ["Q1?", "Q2?"], "eval_prompt": ""})
    )
    prompts, responses = read_monitor_prompts(tokenizer, eval_file=str(tmp_path / "evil.json"))
    assert responses is None and len(prompts) == 2 and "Q2?" in prompts[1]

    with pytest.raises(ValueError, match="exactly one"):
        ActivationMonitor(["v.pt"], [1])


def test_callbacks_on_a_peft_wrapped_model(tmp_path, tokenizer, tiny_llama):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    lora = LoraConfig(
        r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )  # non-zero: LoRA acts
    model = get_peft_model(tiny_llama, lora)
    path = vector_file(tmp_path)
    monitor = ActivationMonitor([path], [1, 2], prompts=["Hi", "Tell me a joke."], max_new_tokens=2)
    module = TinyLM(model, tokenizer, capture_layers=[2])
    make_trainer(tmp_path, [monitor, PreventativeSteering(path, [2], 2.0)], limit_train_batches=1).fit(
        module, loader(tokenizer)
    )
    batch, seen = module.captured["train"][0]
    delta = seen[2] - reference_states(model, batch)[2]
    torch.testing.assert_close(delta, (2.0 * torch.load(path)[2]).expand_as(delta))
    assert len(monitor.history) == 2 * 2 * 2  # (epochs + 1) x layers x kinds
    assert_no_hooks(model)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_monitor_ddp_two_processes_equals_one(tmp_path, tokenizer, tiny_llama):
    """3 records on 2 ranks (shares 2 and 1): NaN-padded all_gather, then the same means as one process."""
    path, eval_file = vector_file(tmp_path), write_jsonl(tmp_path / "eval.jsonl", RECORDS)
    means = {}
    for devices in (1, 2):
        root = tmp_path / f"devices{devices}"
        monitor = ActivationMonitor([path], [1, 3], eval_file=eval_file, batch_size=1)
        trainer = make_trainer(
            root, [monitor], devices=devices, strategy="ddp_spawn" if devices == 2 else "auto"
        )
        trainer.fit(TinyLM(copy.deepcopy(tiny_llama), tokenizer), loader(tokenizer))
        means[devices] = pd.read_csv(root / "monitor.csv")
    assert (means[2]["n"] == len(RECORDS)).all()
    # lr=0 keeps the weights equal; "step" differs (each rank sees half the batches).
    pd.testing.assert_frame_equal(means[2].drop(columns="step"), means[1].drop(columns="step"), rtol=1e-5)


# ---------------------------------------------------------------------------------------------------
# Errors before the first step


def _steering(path, layers):
    return PreventativeSteering(path, layers, 1.0)


def _ablation(path, layers):
    return ConceptAblation(vector_paths=[path], layers=layers)


def _monitor(path, layers):
    return ActivationMonitor([path], layers, prompts=["Hi"])


def _capping(path, layers):
    return ProjectionCapping(path, layers, lo=-1.0, hi=1.0)


@pytest.mark.parametrize(
    "factory", [_steering, _ablation, _capping, _monitor], ids=["steering", "ablation", "capping", "monitor"]
)
@pytest.mark.parametrize(
    "problem, error, message",
    [
        ("missing", FileNotFoundError, "missing_vector.pt does not exist"),
        ("hidden", ValueError, "hidden size 16"),
        ("layer", ValueError, "layer 7 is out of range"),
    ],
)
@pytest.mark.parametrize("module_class", [TinyLM, LazyTinyLM], ids=["eager", "lazy"])
def test_bad_vectors_fail_at_setup_before_the_first_step(
    tmp_path, tokenizer, tiny_llama, factory, problem, error, message, module_class
):
    if problem == "missing":
        path, layers = str(tmp_path / "missing_vector.pt"), [1]
    elif problem == "hidden":
        path, layers = vector_file(tmp_path, "narrow", hidden=16), [1]
    else:
        path, layers = vector_file(tmp_path, "short"), [7]
    module = module_class(tiny_llama, tokenizer)
    with pytest.raises(error, match=message) as caught:
        make_trainer(tmp_path, [factory(path, layers)]).fit(module, loader(tokenizer))
    assert module.steps == 0
    if problem != "missing":
        assert path in str(caught.value)  # the error names the file


def test_vector_with_other_layer_count_fails_against_the_model(tmp_path, tokenizer, tiny_llama):
    path = vector_file(tmp_path, "deeper", rows=NUM_LAYERS + 3)
    module = LazyTinyLM(tiny_llama, tokenizer)
    with pytest.raises(ValueError, match=r"6 rows, but LlamaForCausalLM has 3 blocks"):
        make_trainer(tmp_path, [PreventativeSteering(path, [1], 1.0)]).fit(module, loader(tokenizer))
    assert module.steps == 0


# ---------------------------------------------------------------------------------------------------
# Configuration


def test_callbacks_configurable_from_yaml(tmp_path):
    from lightning.pytorch.cli import LightningCLI
    from lightning.pytorch.demos.boring_classes import BoringModel

    config = tmp_path / "fit.yaml"
    config.write_text(
        "trainer:\n"
        "  logger: false\n"
        "  callbacks:\n"
        "    - class_path: persona.training.callbacks.PreventativeSteering\n"
        "      init_args: {vector_path: persona_vectors/m/evil_response_avg_diff.pt, layers: [10, 12], coef: 5.0}\n"
        "    - class_path: persona.training.callbacks.ConceptAblation\n"
        "      init_args:\n"
        "        vector_paths: [persona_vectors/m/evil_response_avg_diff.pt]\n"
        "        directions_path: extra.pt\n"
        "        layers: [10]\n"
        "    - class_path: persona.training.monitor.ActivationMonitor\n"
        "      init_args:\n"
        "        vector_paths: [persona_vectors/m/evil_response_avg_diff.pt]\n"
        "        layers: [10, 20]\n"
        "        eval_file: datasets/traits/eval/evil.json\n"
        "        every_n_steps: 50\n"
        "        max_new_tokens: 32\n"
    )
    cli = LightningCLI(BoringModel, args=["--config", str(config)], run=False)
    steering, ablation, monitor = (
        next(cb for cb in cli.trainer.callbacks if isinstance(cb, cls))
        for cls in (PreventativeSteering, ConceptAblation, ActivationMonitor)
    )
    assert (steering.layers, steering.coef, steering.during_validation) == ([10, 12], 5.0, False)
    assert (ablation.layers, ablation.directions_path) == ([10], "extra.pt")
    assert (monitor.layers, monitor.every_n_steps, monitor.max_new_tokens, monitor.every_n_epochs) == (
        [10, 20],
        50,
        32,
        1,
    )


# ---------------------------------------------------------------------------------------------------
# ProjectionCapping


def capped_reference(hidden, vector, hi):
    """Independent float64 clamp from above: parallel coefficient min(c, hi), orthogonal part unchanged."""
    h, u = hidden.double(), vector.double() / vector.double().norm()
    coefficient = h @ u
    return h + (coefficient.clamp(max=hi) - coefficient)[..., None] * u


def test_capping_clamps_the_projection_in_training_steps_only(tmp_path, tokenizer, tiny_llama):
    from persona.vectors.ranges import PROJECTION_PERCENTILES, percentile_record

    layer = 2
    vector = torch.randn(NUM_LAYERS + 1, HIDDEN, generator=torch.Generator().manual_seed(5))
    batches = list(loader(tokenizer))
    projections = torch.cat(
        [
            reference_states(tiny_llama, b)[layer][b["attention_mask"].bool()]
            @ (vector[layer] / vector[layer].norm())
            for b in batches
        ]
    )
    hi = float(projections.median())  # about half the positions pass above: they get capped
    table = [[0.0] * len(PROJECTION_PERCENTILES) for _ in range(NUM_LAYERS + 1)]
    table[layer][PROJECTION_PERCENTILES.index(50)] = hi
    path = str(
        save_vector(
            vector,
            tmp_path / "evil_response_avg_diff.pt",
            {"negative_projection_percentiles": percentile_record(table)},
        )
    )
    module = TinyLM(tiny_llama, tokenizer, capture_layers=[layer])
    callback = ProjectionCapping(path, [layer], hi="p50")
    make_trainer(tmp_path, [callback], limit_train_batches=2).fit(
        module, loader(tokenizer), loader(tokenizer)
    )

    assert callback.ranges == {layer: (None, hi)}
    for batch, seen in module.captured["train"]:
        states = reference_states(tiny_llama, batch)[layer]
        expected = capped_reference(states, vector[layer], hi)
        torch.testing.assert_close(seen[layer].double(), expected, atol=1e-5, rtol=1e-5)
        assert not torch.equal(seen[layer], states)
    for batch, seen in module.captured["val"]:
        assert torch.equal(seen[layer], reference_states(tiny_llama, batch)[layer])
    assert not callback.active
    assert_no_hooks(tiny_llama)


def test_capping_without_recorded_percentiles_fails_at_setup_naming_the_sidecar(
    tmp_path, tokenizer, tiny_llama
):
    path = vector_file(tmp_path)  # a sidecar without negative_projection_percentiles
    module = TinyLM(tiny_llama, tokenizer)
    with pytest.raises(
        ValueError, match=r"ProjectionCapping.hi='p99': .*evil_response_avg_diff.json records no"
    ):
        make_trainer(tmp_path, [ProjectionCapping(path, [1])]).fit(module, loader(tokenizer))
    assert module.steps == 0
    with pytest.raises(ValueError, match="lo and hi are both None"):
        ProjectionCapping(path, [1], lo=None, hi=None)


def test_capping_at_a_neutral_percentile_of_an_older_file_measures_it_once_with_the_model(
    tmp_path, tokenizer, tiny_llama
):
    """Issue 25: ``hi="neutral:p99"`` on a file without the record: measured with the model being trained before
    the first step (independently: a plain hidden_states pass per neutral text), cached beside the file."""
    import numpy as np

    from persona.vectors.neutral import cache_path, neutral_texts

    layer, path = 2, vector_file(tmp_path)
    unit = torch.load(path)[layer].double()
    unit = unit / unit.norm()
    projections = []
    for text in neutral_texts():
        states = reference_states(tiny_llama, tokenizer(text, return_tensors="pt"))[layer][0]
        projections.append(float(states[1:].double().mean(0) @ unit))
    module = TinyLM(tiny_llama, tokenizer)
    callback = ProjectionCapping(path, [layer], hi="neutral:p99")
    make_trainer(tmp_path, [callback], limit_train_batches=1).fit(module, loader(tokenizer))
    assert callback.ranges[layer][1] == pytest.approx(np.percentile(projections, 99), rel=1e-4)
    assert module.steps == 1 and module.model.training  # measured in eval mode, training mode restored
    assert cache_path(path, "neutral").is_file()
    again = ProjectionCapping(path, [layer], hi="neutral:p99")
    again.setup(None, types.SimpleNamespace(model=None), "fit")  # from the cache: resolved before any model
    assert again.ranges == callback.ranges


def test_capping_parses_in_a_fit_config_by_its_short_name(tmp_path):
    from lightning.pytorch.cli import LightningCLI
    from lightning.pytorch.demos.boring_classes import BoringModel

    config = tmp_path / "fit.yaml"
    config.write_text(
        "trainer:\n"
        "  logger: false\n"
        "  callbacks:\n"
        "    - class_path: persona.training.ProjectionCapping\n"
        "      init_args: {vector_path: v.pt, layers: [10], lo: p1, hi: 2.5, during_validation: true}\n"
    )
    cli = LightningCLI(BoringModel, args=["--config", str(config)], run=False)
    [capping] = [cb for cb in cli.trainer.callbacks if isinstance(cb, ProjectionCapping)]
    assert (capping.layers, capping.lo, capping.hi, capping.during_validation) == ([10], "p1", 2.5, True)


def test_monitor_reuses_another_runs_start_reading_without_a_forward(
    tmp_path, tokenizer, tiny_llama, monkeypatch
):
    """The study's runs share one base: the second takes the first's reading before training (no forward at train
    start), with the same rows as measuring it; a resumed fit (step > 0) would measure anyway."""
    from persona.training import monitor as monitor_module

    path = vector_file(tmp_path)
    eval_file = write_jsonl(tmp_path / "eval.jsonl", RECORDS)
    base = copy.deepcopy(tiny_llama)

    def fit(model, reuse=None, root="a"):
        monitor = ActivationMonitor([path], [1, 2], eval_file=eval_file, batch_size=2)
        if reuse is not None:
            monitor.reuse_start(reuse)
        make_trainer(tmp_path / root, [monitor], limit_train_batches=1).fit(
            TinyLM(model, tokenizer), loader(tokenizer)
        )
        return monitor

    first = fit(tiny_llama)
    calls = []
    real = monitor_module.example_projections
    monkeypatch.setattr(
        monitor_module, "example_projections", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    measured = fit(copy.deepcopy(base), root="b")
    measured_calls, calls[:] = len(calls), []
    reused = fit(copy.deepcopy(base), reuse=first.start_values, root="c")
    assert len(calls) < measured_calls  # the start reading came from the first run: fewer forwards
    start = [row for row in measured.history if row["trigger"] == "train_start"]
    assert [row for row in reused.history if row["trigger"] == "train_start"] == start
    assert reused.history == measured.history  # and everything after it is measured as usual
