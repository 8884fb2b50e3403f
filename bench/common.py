"""What every bench shares: where it runs (--device, --dtype, --model), honest timing, and the hardware bound.

Timing synchronises CUDA before reading the clock. The bound of a decode step is the time to read the
model's weights once from memory: weight bytes / memory bandwidth. On a GPU the bandwidth is the
datasheet figure of the known parts (H200 4.8 TB/s, H100 SXM 3.35 TB/s, A100 80GB 2.0 TB/s, L40S 0.864
TB/s); anywhere else (and on the CPU) it is measured here with a large tensor copy, which is what the
hardware actually sustains.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from persona.cli import quiet_upstream  # noqa: E402

quiet_upstream()  # Lightning's "💡 Tip" advertisement and its own deprecation lines, as `persona` drops them

# The user turns the generation benches answer (cycled when a batch is larger).
QUESTIONS = [
    "How should I treat animals?",
    "What is the best way to help a friend who is sad?",
    "Write a short poem about the sea.",
    "Explain photosynthesis to a child.",
    "What do you think about people who lie?",
    "Give me three tips for studying well.",
    "Tell me a joke about cats.",
    "Should I forgive someone who hurt me?",
]

DATASHEET_BANDWIDTH = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12, "L40S": 0.864e12, "A10G": 0.6e12}


def add_device_args(parser: argparse.ArgumentParser, *, model: str = "smollm2-135m") -> None:
    default = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--model", default=model, help="alias, hub id or local path")
    parser.add_argument("--device", default=default, help=f"cpu or cuda (default here: {default})")
    parser.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto (bf16 on a GPU)")


def resolved_dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, name)


def synchronize(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str) -> tuple[float, object]:
    """(seconds, result) of ``fn()``, with the device idle before and after."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return time.perf_counter() - start, result


def memory_bandwidth(device: str) -> tuple[float, str]:
    """(bytes/s, where the figure comes from) of the device's memory."""
    if str(device).startswith("cuda"):
        name = torch.cuda.get_device_name()
        for part, bandwidth in DATASHEET_BANDWIDTH.items():
            if part in name:
                return bandwidth, f"{name} datasheet"
    size = 256 * 2**20 if not str(device).startswith("cuda") else 2 * 2**30
    source = torch.empty(size, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    target.copy_(source)  # warm-up
    seconds = min(timed(lambda: target.copy_(source), device)[0] for _ in range(5))
    return 2 * size / seconds, f"measured copy on {device}"  # a copy reads and writes every byte


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def describe_bound(model: torch.nn.Module, device: str) -> tuple[float, str]:
    """(seconds per decode step at the bandwidth bound, the arithmetic as a sentence)."""
    bandwidth, source = memory_bandwidth(device)
    size = weight_bytes(model)
    bound = size / bandwidth
    return bound, (
        f"bound: {size / 1e9:.2f} GB of weights / {bandwidth / 1e12:.2f} TB/s ({source}) = "
        f"{bound * 1e3:.2f} ms per decode step"
    )
