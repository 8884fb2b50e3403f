"""Model load time where the user runs: the embedded model's GGUF conversion vs its cached safetensors, or any
model's load onto the device (twice: the second read comes from the page cache).

    python bench/load.py [--model smollm2-135m] [--device cuda] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import os
import tempfile

from common import add_device_args, resolved_dtype, timed, weight_bytes

from persona.models import DEFAULT_MODEL, load_model, load_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_device_args(parser, model=DEFAULT_MODEL)
    args = parser.parse_args()
    dtype = str(resolved_dtype(args.dtype, args.device)).removeprefix("torch.")

    def load():
        load_tokenizer(args.model)
        return load_model(args.model, dtype=dtype, device=args.device)

    if args.model == DEFAULT_MODEL:
        with tempfile.TemporaryDirectory() as cache:
            os.environ["PERSONA_CACHE_DIR"] = cache  # an empty cache: the first load converts the GGUF file
            first, model = timed(load, args.device)
            second, _ = timed(load, args.device)
        labels = ("first load (GGUF conversion)", "second load (cache)")
    else:
        first, model = timed(load, args.device)
        second, _ = timed(load, args.device)
        labels = ("first load", "second load")
    size = weight_bytes(model) / 1e9
    print(f"model={args.model} device={args.device} dtype={dtype} weights={size:.2f} GB")
    print(
        f"{labels[0]}: {first:.2f} s   {labels[1]}: {second:.2f} s ({size / second:.2f} GB/s)   "
        f"ratio {first / second:.1f}x"
    )


if __name__ == "__main__":
    main()
