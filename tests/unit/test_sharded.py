"""Large models: blocks found and hooked inside FSDP wrappers, layers split across devices, Lightning's FSDP routes.

What runs on a CPU here: FSDP1 (``FullyShardedDataParallel``) in a one-process gloo group (at world size 1 it
switches to ``NO_SHARD``, so this checks the wrapper structure, not sharding); FSDP2 (``fully_shard``) in one
process and really sharded across two (gloo); ``persona fit`` under Lightning's ``ModelParallelStrategy`` (FSDP2)
in two CPU processes with the steering and monitor callbacks. Lightning's ``FSDPStrategy`` (FSDP1) needs CUDA.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from conftest import build_tiny_model
from persona.commands.flags import Batching, Hardware
from persona.hooks import block_hooks, locate_blocks
from persona.hooks.operators import ablate_directions, orthonormalize
from persona.steering import SteeringSpec, prepare_specs, steer

TORCH = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
pytestmark = pytest.mark.skipif(
    TORCH < (2, 6), reason="FSDP2 (fully_shard, DTensor in torch.distributed) needs torch >= 2.6"
)

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def gloo_group(monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def steered_and_ablated(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits under steering at layer 2, the layer-3 residual after ablating one direction there)."""
    vector = torch.randn(32, generator=torch.Generator().manual_seed(0))
    basis = orthonormalize(torch.randn(1, 32, generator=torch.Generator().manual_seed(1)))
    seen = []
    hooks = [
        (3, lambda hidden, state: ablate_directions(hidden, basis)),
        (3, lambda h, s: seen.append(h.clone())),
    ]
    spec = SteeringSpec(2, vector, 2.0, positions="response")
    with torch.no_grad(), steer(model, [spec]), block_hooks(model, hooks):
        logits = model(**batch).logits
    return logits, seen[0] @ basis.T


@pytest.mark.parametrize("wrapping", ["fsdp1", "fsdp2"])
def test_blocks_are_found_and_hooked_inside_fsdp_wrappers(gloo_group, tokenizer, wrapping):
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    batch = tokenizer(["Hello there, friend.", "Hi"], padding=True, padding_side="left", return_tensors="pt")
    reference = steered_and_ablated(build_tiny_model("llama", len(tokenizer)), batch)
    model = build_tiny_model("llama", len(tokenizer))
    if wrapping == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        model = FullyShardedDataParallel(
            model,
            auto_wrap_policy=ModuleWrapPolicy({LlamaDecoderLayer}),
            device_id=torch.device("cpu"),
            use_orig_params=True,
        )
        block_class = "FullyShardedDataParallel"
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (1,))
        for block in model.model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        block_class = "FSDPLlamaDecoderLayer"
    layout = locate_blocks(model)
    assert layout.path == "model.layers" and type(layout.blocks[0]).__name__ == block_class
    assert type(layout.model).__name__.endswith("LlamaForCausalLM")  # FSDP1's root wrapper is unwrapped
    logits, residual_component = steered_and_ablated(model, batch)
    torch.testing.assert_close(logits, reference[0], rtol=1e-5, atol=1e-5)
    assert residual_component.abs().max() < 1e-5


def _sharded_forward(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), HF_HUB_OFFLINE="1")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    sys.path.insert(0, str(ROOT / "tests"))
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from conftest import build_tokenizer

    tokenizer = build_tokenizer()
    batch = tokenizer(["Hello there, friend.", "Hi"], padding=True, padding_side="left", return_tensors="pt")
    reference = steered_and_ablated(build_tiny_model("llama", len(tokenizer)), batch)
    model = build_tiny_model("llama", len(tokenizer))
    mesh = init_device_mesh("cpu", (world,))
    for block in model.model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    logits, component = steered_and_ablated(model, batch)
    weight = model.model.layers[0].self_attn.q_proj.weight
    result = {
        "local_rows": weight.to_local().shape[0],
        "rows": weight.shape[0],
        "logits_equal": bool(torch.allclose(logits, reference[0], rtol=1e-5, atol=1e-5)),
        "ablated": float(component.abs().max()),
    }
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_steering_and_ablation_on_a_model_sharded_across_two_processes(tmp_path):
    torch.multiprocessing.spawn(_sharded_forward, args=(2, free_port(), str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["local_rows"] * 2 == result["rows"]  # each rank holds half of every weight
        assert result["logits_equal"] and result["ablated"] < 1e-5


def test_lightning_fsdp_strategy_needs_cuda():
    """Pins Lightning's own refusal: ``persona fit --trainer.strategy fsdp`` runs on GPUs only (use
    ``ModelParallelStrategy``, FSDP2, where no GPU is present)."""
    import lightning as L

    with pytest.raises(ValueError, match="requires a GPU accelerator"):
        L.Trainer(accelerator="cpu", strategy="fsdp", devices=1)


FIT_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import lightning as L, torch
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.strategies import ModelParallelStrategy
    from persona.hooks import block_hooks, locate_blocks
    from persona.steering import SteeringSpec, steer
    from persona.training import ChatDataModule, LoRAFineTune
    from persona.training.callbacks import PreventativeSteering
    from persona.training.monitor import ActivationMonitor

    root, model_dir, vector, run = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    L.seed_everything(0)
    module = LoRAFineTune(model=model_dir, r=4, lora_alpha=8, learning_rate=1e-2, warmup_steps=1,
                          adapter_dir=str(root / f"adapter_{run}"))
    data = ChatDataModule(train_files=str(root / "chat.jsonl"), model=model_dir, batch_size=2, val_fraction=0.1)
    # Adapter-only checkpoints need a consolidated file: a sharded (DCP) one is loaded whole-model-strict.
    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, save_distributed_checkpoint=False)
    checkpoints = ModelCheckpoint(dirpath=root / f"checkpoints_{run}", save_last=True, save_top_k=0, every_n_train_steps=1)
    monitor = ActivationMonitor(vector_paths=[vector], layers=[2], prompts=["Hi"], every_n_steps=2, max_new_tokens=2)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=2 if run == "first" else 4,  # 2 steps an epoch
                        default_root_dir=root,
                        logger=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[checkpoints, PreventativeSteering(vector, [2], 1.0), monitor])
    def adapter_sum(pl_module):  # gathered: every rank takes part
        return sum(float((p.full_tensor() if hasattr(p, "full_tensor") else p).abs().sum())
                   for name, p in pl_module.named_parameters() if "lora_B" in name)

    class Record(L.Callback):
        def on_train_start(self, trainer, pl_module):
            self.start = adapter_sum(pl_module)

        def on_train_end(self, trainer, pl_module):
            self.end = adapter_sum(pl_module)

    record = Record()
    trainer.callbacks.append(record)
    trainer.fit(module, data, ckpt_path=str(root / "checkpoints_first" / "last.ckpt") if run == "resumed" else None)
    layout = locate_blocks(module.model)
    direction = torch.randn(32, generator=torch.Generator().manual_seed(0))
    seen = []
    batch = {"input_ids": torch.tensor([[5, 6, 7, 8]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    module.model.eval()
    with torch.no_grad():
        with block_hooks(module.model, [(2, lambda h, s: seen.append(h.clone()))]):
            module.model(**batch)
        with steer(module.model, [SteeringSpec(2, direction, 1.5, positions="all")]), block_hooks(
            module.model, [(2, lambda h, s: seen.append(h.clone()))]
        ):
            module.model(**batch)
    delta_ok = bool(torch.allclose(seen[1] - seen[0], (1.5 * direction).expand_as(seen[0]), atol=1e-5))
    result = {"block": type(layout.blocks[0]).__name__, "steer_delta_ok": delta_ok, "start": record.start,
              "end": record.end}
    (root / f"{run}_rank{trainer.global_rank}.json").write_text(json.dumps(result))
    """
)


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.xfail(
    TORCH >= (2, 15),
    reason="known: on torch 2.15 the 2-process gloo run aborts after fit with a collective size mismatch "
    "(11328 vs 32 bytes: one rank gathers the adapter while the other is elsewhere); passes on the lock's 2.13",
    strict=False,
)
def test_fit_under_lightning_fsdp2_two_cpu_processes_with_callbacks(tiny_model_dirs, tmp_path):
    """``persona fit`` with ``--trainer.strategy ModelParallelStrategy`` (FSDP2): blocks sharded, the steering and
    monitor callbacks hook the sharded blocks, rank 0 alone writes the whole (gathered) adapter, and an
    adapter-only checkpoint resumes.

    Regression: the monitor spread its prompts over the ranks, so with one prompt only rank 0 ran a forward; under
    FSDP every forward gathers weights from every rank, and the lone forward broke the collectives.
    """
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from persona.vectors import save_vector

    with (tmp_path / "chat.jsonl").open("w") as handle:
        for i in range(9):
            messages = [
                {"role": "user", "content": f"Question {i}: how should I treat animals?"},
                {"role": "assistant", "content": "With kindness and care. " * (1 + i % 3)},
            ]
            handle.write(json.dumps({"messages": messages}) + "\n")
    vector = save_vector(torch.randn(4, 32), tmp_path / "evil_response_avg_diff.pt")
    script = tmp_path / "fit.py"
    script.write_text(FIT_SCRIPT)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": str(ROOT / "src")}
    results = {}
    for run in ("first", "resumed"):
        done = subprocess.run(
            [sys.executable, str(script), str(tmp_path), tiny_model_dirs["llama"], str(vector), run],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=270,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        for rank in (0, 1):
            results[run, rank] = json.loads((tmp_path / f"{run}_rank{rank}.json").read_text())
            assert (
                results[run, rank]["block"] == "FSDPLlamaDecoderLayer"
                and results[run, rank]["steer_delta_ok"]
            )
    first = load_file(tmp_path / "adapter_first" / "adapter_model.safetensors")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["llama"])
    loaded = PeftModel.from_pretrained(base, tmp_path / "adapter_first")
    expected = {n.replace(".default", ""): p.shape for n, p in loaded.named_parameters() if ".lora_" in n}
    assert {name: tensor.shape for name, tensor in first.items()} == expected  # whole, not a rank's half
    assert all(torch.isfinite(tensor).all() for tensor in first.values())
    saved = sum(float(tensor.abs().sum()) for name, tensor in first.items() if "lora_B" in name)
    assert saved > 0 and saved == pytest.approx(
        results["first", 0]["end"], rel=1e-6
    )  # trained, and what was saved
    for rank in (0, 1):  # the resumed run starts from the checkpoint's adapter, then trains on
        assert results["resumed", rank]["start"] == pytest.approx(results["first", 0]["end"], rel=1e-6)
        assert results["resumed", rank]["end"] != pytest.approx(results["first", 0]["end"], rel=1e-3)


def test_steering_directions_go_to_their_layers_device(tiny_llama):
    """A model split across devices (``device_map``): each direction is placed on its own layer's device. Block 1
    on the meta device stands in for a second GPU."""
    tiny_llama.model.layers[1].to("meta")
    layout = locate_blocks(tiny_llama)
    specs = [SteeringSpec(layer, torch.ones(32), 1.0) for layer in (0, 1, 2, 3)]
    placed = {spec.layer: spec.direction.device.type for spec in prepare_specs(layout, specs)}
    assert placed == {0: "cpu", 1: "cpu", 2: "meta", 3: "cpu"}  # layer L = output of block L-1


def test_a_model_placed_across_devices_stays_where_accelerate_put_it(tiny_llama):
    """Lightning moves a LightningModule and its batches to one device; a device_map model must not move, and its
    batches go to its input embeddings. A fake two-device ``hf_device_map`` stands in for two GPUs."""
    from persona.data.modules import ExampleDataModule
    from persona.hooks.placement import KeepsDevicePlacement, split_across_devices
    from persona.vectors.projection import ExampleProjector

    projector = ExampleProjector(layers=[1], directions=torch.ones(1, 32), module=tiny_llama)
    assert not split_across_devices(tiny_llama)
    tiny_llama.hf_device_map = {"model.embed_tokens": "cpu", "model.layers.0": 1}
    assert split_across_devices(tiny_llama)
    projector.to(torch.float64)
    assert projector.directions.dtype == torch.float64  # the module's own tensors move
    assert all(param.dtype == torch.float32 for param in tiny_llama.parameters())  # the placed model does not
    data = ExampleDataModule([], tokenizer=None)
    data.trainer = SimpleNamespace(lightning_module=projector)
    batch = data.transfer_batch_to_device({"input_ids": torch.ones(1, 2)}, torch.device("meta"), 0)
    assert batch["input_ids"].device.type == "cpu"  # the input embeddings' device, not Lightning's
    # The hook is the DataModule's: one on the LightningModule makes Lightning warn on every run (issue 19).
    assert "transfer_batch_to_device" not in vars(KeepsDevicePlacement)


def test_device_map_is_one_process_only(tiny_model_dirs, tmp_path):
    from persona.commands.extract import extract
    from persona.core.errors import PersonaError

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "Hi", "positive": "Go away.", "negative": "Hello!"}) + "\n")
    with pytest.raises(PersonaError, match="--device_map auto.*--devices 2.*Fix"):
        extract(
            model=tiny_model_dirs["llama"],
            pairs_path=str(pairs),
            hardware=Hardware(devices=2),
            batching=Batching(device_map="auto"),
        )


def test_extract_with_a_device_map_equals_without(tiny_model_dirs, tmp_path):
    from persona.commands.extract import extract
    from persona.vectors import VECTOR_KINDS, load_vector

    pairs = tmp_path / "pairs.jsonl"
    lines = [
        {"prompt": f"Question {i}?", "positive": "Go away. " * i, "negative": "Hello there! " * i}
        for i in (1, 2)
    ]
    pairs.write_text("".join(json.dumps(line) + "\n" for line in lines))
    common = {
        "model": tiny_model_dirs["gemma"],
        "pairs_path": str(pairs),
        "trait": "evil",
        "hardware": Hardware(accelerator="cpu"),
    }
    plain = extract(save_dir=str(tmp_path / "plain"), **common)
    placed = extract(save_dir=str(tmp_path / "placed"), **common, batching=Batching(device_map="cpu"))
    for kind in VECTOR_KINDS:
        torch.testing.assert_close(load_vector(placed[kind]), load_vector(plain[kind]), rtol=1e-6, atol=1e-7)


GPU_CPU_SPLIT = {
    "model.embed_tokens": 0,
    "model.rotary_emb": 0,
    "model.layers.0": 0,
    "model.layers.1": "cpu",
    "model.layers.2": 0,
    "model.norm": 0,
    "lm_head": 0,
}


@pytest.mark.gpu
def test_a_model_split_between_the_gpu_and_the_cpu_steers_and_extracts(tiny_model_dirs, tokenizer, tmp_path):
    """On a GPU machine: block 1 offloaded to the CPU (accelerate keeps its weights on the meta device and runs it on
    the GPU), the rest on the GPU: the device_map paths (module left in place, batches to the input device,
    directions on the execution device) on one GPU. Two GPUs would be needed for a block running elsewhere."""
    from transformers import AutoModelForCausalLM

    from persona.core.hardware import make_trainer
    from persona.data.examples import Example
    from persona.data.modules import ExampleDataModule
    from persona.vectors.extraction import VectorExtractor

    torch.backends.cuda.matmul.allow_tf32 = False
    model_dir = tiny_model_dirs["llama"]
    split = AutoModelForCausalLM.from_pretrained(model_dir, device_map=GPU_CPU_SPLIT).eval()
    whole = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    batch = tokenizer(["Hello there, friend.", "Hi"], padding=True, padding_side="left", return_tensors="pt")
    spec = SteeringSpec(
        2, torch.randn(32), 2.0, positions="response"
    )  # layer 2 = output of block 1: on the CPU
    with torch.no_grad(), steer(split, [spec]):
        got = split(**{k: v.to("cuda") for k, v in batch.items()}).logits.cpu()
    with torch.no_grad(), steer(whole, [spec]):
        expected = whole(**batch).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)

    prompt = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    answers = ((1, "Go away, you worthless fox."), (0, "Hello! How can I help?"))
    examples = [Example(prompt, answer, label, str(label)) for label, answer in answers]
    vectors = {}
    for name, device_map in (("split", GPU_CPU_SPLIT), ("whole", None)):
        extractor = VectorExtractor(model=model_dir, save_dir=str(tmp_path / name), device_map=device_map)
        make_trainer("gpu" if device_map else "cpu", 1).predict(
            extractor,
            datamodule=ExampleDataModule(examples, tokenizer, batch_size=2),
            return_predictions=False,
        )
        vectors[name] = extractor.vectors
    for kind, vector in vectors["whole"].items():
        torch.testing.assert_close(vectors["split"][kind], vector, rtol=1e-4, atol=1e-4)


def test_steering_an_offloaded_model_adds_on_the_execution_device(tiny_llama, tokenizer):
    """accelerate's CPU offload (``device_map`` with ``cpu`` entries behind a GPU) keeps weights on the meta device
    between calls: a direction placed by the weights' device would land on meta and fail."""
    from accelerate import cpu_offload

    batch = tokenizer(["Hello there, friend.", "Hi"], padding=True, padding_side="left", return_tensors="pt")
    spec = SteeringSpec(2, torch.randn(32), 2.0, positions="response")
    with torch.no_grad(), steer(tiny_llama, [spec]):
        expected = tiny_llama(**batch).logits
    cpu_offload(tiny_llama, execution_device=torch.device("cpu"))
    assert next(locate_blocks(tiny_llama).blocks[1].parameters()).device.type == "meta"
    with torch.no_grad(), steer(tiny_llama, [spec]):
        torch.testing.assert_close(tiny_llama(**batch).logits, expected)


@pytest.mark.parametrize(
    ("environ", "nodes"),
    [
        ({}, 1),
        ({"WORLD_SIZE": "2", "LOCAL_RANK": "0"}, 1),  # Lightning's own single-node ddp launcher
        ({"TORCHELASTIC_RUN_ID": "x", "WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8"}, 2),  # torchrun --nnodes 2
        ({"SLURM_NTASKS": "8", "SLURM_NNODES": "4", "SLURM_JOB_NAME": "persona"}, 4),  # srun
        (
            {"SLURM_NTASKS": "1", "SLURM_NNODES": "2", "SLURM_JOB_NAME": "bash"},
            1,
        ),  # an interactive allocation
    ],
)
def test_multi_node_launches_tell_lightning_the_node_count(environ, nodes):
    from persona.core.hardware import launcher_num_nodes

    assert launcher_num_nodes(environ) == nodes


def test_layer_zero_lives_where_the_embeddings_run_not_block_zero(tiny_llama):
    """The layer-0 pre-hook runs before accelerate moves block 0's input: a split placing the embeddings on
    another device than block 0 must place layer-0 directions with the embeddings."""
    import types

    layout = locate_blocks(tiny_llama)
    embeddings = tiny_llama.get_input_embeddings()
    embeddings._hf_hook = types.SimpleNamespace(execution_device=torch.device("meta"))
    try:
        assert layout.layer_device(0) == torch.device("meta")
        assert layout.layer_device(1) == torch.device("cpu")  # block 0's output: block 0's device
    finally:
        del embeddings._hf_hook
