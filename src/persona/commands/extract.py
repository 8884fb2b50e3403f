"""``persona extract``: persona vectors from scored response CSVs or contrastive pairs (the seed's generate_vec)."""

from __future__ import annotations

from pathlib import Path

from persona.commands.flags import Batching, Hardware
from persona.core import checks
from persona.data.examples import check_example_files
from persona.models import DEFAULT_MODEL, model_on_base, model_source
from persona.vectors import VECTOR_KINDS, default_save_dir, vector_filename


def extract(
    model: str = DEFAULT_MODEL,
    base_model: str | None = None,
    pos_path: str | None = None,
    neg_path: str | None = None,
    trait: str = "trait",
    save_dir: str | None = None,
    threshold: float = 50.0,
    no_filter: bool = False,
    pairs_path: str | None = None,
    split: str | None = None,
    batch_size: int = 8,
    overwrite: bool = False,
    hardware: Hardware = Hardware(),
    batching: Batching = Batching(),
) -> dict[str, str]:
    """Extract persona vectors: mean activation on trait-showing responses minus on the others, per layer.

    Writes <save_dir>/<trait>_{prompt_avg,response_avg,prompt_last}_diff.pt ([num_layers+1, hidden],
    row 0 = embeddings, row L = output of block L-1) with a JSON sidecar each.

    Args:
        model: Model alias (smollm2-135m, the embedded default), hub id or local path.
        base_model: With --model a LoRA adapter: the base model to apply it on instead of the one its adapter_config.json records (e.g. a path from another machine); the adapter's files are left as they are.
        pos_path: CSV of responses showing the trait (question, prompt, answer, question_id, <trait>, coherence).
        neg_path: CSV of responses not showing it, row-aligned with pos_path.
        trait: Trait name (the score column, and the output file prefix).
        save_dir: Output folder; default persona_vectors/<model-short-name>/.
        threshold: Keep pairs with pos score >= threshold, neg score < 100 - threshold (both coherence >= 50).
        no_filter: Use every row (files without score columns).
        pairs_path: Contrastive pairs instead of CSVs (JSONL {prompt|messages, positive, negative}, TRAIT items, persona statements).
        split: With pairs_path: only pairs of this split (e.g. train).
        batch_size: Examples per forward pass.
        overwrite: Replace vector files that already exist in save_dir.
    """
    model = model_on_base(model, base_model)
    checks.example_inputs(pos_path, neg_path, pairs_path)
    checks.at_least(batch_size, 1, "--batch_size")
    checks.device_map_alone(batching.device_map, hardware.devices, hardware.strategy)
    model_source(model)
    folder = Path(save_dir) if save_dir else default_save_dir(model)
    names = [vector_filename(trait, kind) for kind in VECTOR_KINDS]
    inputs = {"--pos_path": pos_path, "--neg_path": neg_path, "--pairs_path": pairs_path}
    checks.output_dir(folder, "--save_dir", produces=names, overwrite=overwrite, inputs=inputs)

    check_example_files(pos_path, neg_path, pairs_path, trait, no_filter)

    from persona.core.hardware import make_trainer
    from persona.data.modules import ResponseDataModule
    from persona.vectors.extraction import VectorExtractor

    datamodule = ResponseDataModule(
        model=model,
        pos_path=pos_path,
        neg_path=neg_path,
        trait=trait,
        threshold=threshold,
        no_filter=no_filter,
        pairs_path=pairs_path,
        split=split,
        batch_size=batch_size,
        max_length=batching.max_length,
        trust_remote_code=hardware.trust_remote_code,
        max_batch_tokens=batching.max_batch_tokens,
    )
    datamodule.load_examples()  # the rows and their filter, before the model loads
    extractor = VectorExtractor(
        model=model,
        trait=trait,
        save_dir=str(folder),
        dtype=hardware.dtype,
        trust_remote_code=hardware.trust_remote_code,
        device_map=batching.device_map,
    )
    make_trainer(hardware.accelerator, hardware.devices, hardware.strategy).predict(
        extractor, datamodule=datamodule, return_predictions=False
    )
    # Named here rather than read back from the module: under ddp_spawn rank 0 writes in a child process.
    paths = {kind: str(folder / name) for kind, name in zip(VECTOR_KINDS, names, strict=True)}
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return paths
