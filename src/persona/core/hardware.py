"""One meaning for ``--accelerator``, ``--devices``, ``--strategy`` and ``--dtype`` in every command.

Lightning loops (extract, project, layers, generate, fit, screen, shift) take them as Lightning does. Work
that runs in this process on one device (generation inside a study phase, the local judge) asks
:func:`resolve_device`, which reads ``--accelerator`` the same way: ``auto`` is the GPU when there is one.
``--dtype auto`` is bfloat16 on a GPU that supports it, float32 otherwise.
"""

from __future__ import annotations

ACCELERATORS = ("auto", "cpu", "gpu", "cuda")


def resolve_device(accelerator: str = "auto"):
    """The one ``torch.device`` in-process work runs on, for a Lightning ``accelerator`` name."""
    import torch

    if accelerator not in ACCELERATORS:
        raise ValueError(f"--accelerator {accelerator!r}. Fix: use one of {', '.join(ACCELERATORS)}.")
    if accelerator == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if accelerator == "auto":
        return torch.device("cpu")
    raise ValueError(
        f"--accelerator {accelerator} but no CUDA device is visible. Fix: --accelerator cpu (or auto)."
    )


DTYPES = ("float32", "bfloat16", "float16", "auto")


def check_dtype(dtype: str) -> str:
    """Validate a ``--dtype`` value without importing torch."""
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}. Fix: use one of {', '.join(DTYPES)}.")
    return dtype


def resolve_dtype(dtype):
    """A ``torch.dtype`` for a ``--dtype`` value (``auto``: bfloat16 on a GPU that supports it, else float32)."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    value = getattr(torch, dtype, None) if isinstance(dtype, str) else None
    if not isinstance(value, torch.dtype):
        raise ValueError(
            f"--dtype {dtype!r} is not a torch dtype. Fix: use float32, bfloat16, float16 or auto."
        )
    return value


def release_memory() -> None:
    """Free what a finished model left behind: collect its reference cycles (PEFT models and Trainers hold
    some), return cached CUDA blocks, and hand freed heap pages back to the OS (glibc keeps them otherwise,
    so a long study's resident memory grows run after run)."""
    import contextlib
    import ctypes
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    with contextlib.suppress(OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def precision_for(dtype) -> str:
    """Lightning's ``*-true`` precision for a model dtype: the whole module runs in it (adapters included)."""
    return {"torch.bfloat16": "bf16-true", "torch.float16": "16-true"}.get(
        str(resolve_dtype(dtype)), "32-true"
    )


def launcher_num_nodes(environ=None) -> int:
    """The node count of a multi-node launch, read from its launcher's environment; 1 otherwise.

    ``torchrun --nnodes N --nproc-per-node D`` sets ``WORLD_SIZE`` and ``LOCAL_WORLD_SIZE`` (N = their ratio);
    ``srun`` sets ``SLURM_NNODES``. Lightning checks devices x nodes against the launcher's world size, so the
    pipeline commands pass it on (``persona fit`` takes ``--trainer.num_nodes``).
    """
    import os

    env = os.environ if environ is None else environ
    if "TORCHELASTIC_RUN_ID" in env and "WORLD_SIZE" in env and "LOCAL_WORLD_SIZE" in env:
        return max(1, int(env["WORLD_SIZE"]) // int(env["LOCAL_WORLD_SIZE"]))
    if "SLURM_NTASKS" in env and env.get("SLURM_JOB_NAME") not in ("bash", "interactive"):
        return max(1, int(env.get("SLURM_NNODES", "1")))
    return 1


def make_trainer(
    accelerator: str = "auto", devices: int | str = 1, strategy: str = "auto", callbacks: list | None = None
):
    """A Trainer for predict loops: no logger, no checkpoints (the loops write their own results); SIGTERM stops it."""
    import lightning as L

    from persona.core.signals import StopOnSigterm

    return L.Trainer(
        accelerator=accelerator,
        devices=devices,
        num_nodes=launcher_num_nodes(),
        strategy=strategy,
        callbacks=[*(callbacks or []), StopOnSigterm()],
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )


def input_device(model):
    """Where a model's token ids must go: its input embeddings' device (also under device_map="auto")."""
    return model.get_input_embeddings().weight.device
