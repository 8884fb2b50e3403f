"""Fast steered generation: a static KV cache, and ``torch.compile`` of the decode step where it pays (CUDA).

Eager ``generate`` on a GPU spends most of a decode step launching kernels; a static cache lets transformers
compile the decode step (``reduce-overhead``: CUDA graphs) and run it near the memory-bandwidth bound. Two
things break steering on that path, and this module handles both:

- transformers builds 4D masks for a static cache, so a hook cannot see each row's real prompt tokens: the
  session hands the batch's 2D prompt mask to the hooks (``ForwardState.prompt_mask``), used only at prefill and
  only where its shape is the forward's.
- ``torch.compile`` does not guard on module hooks by default: a forward compiled without our hooks keeps
  running without them after they are attached (and one compiled with them keeps steering after they are
  removed). So a :class:`FastGenerator` session attaches its hooks once, for its whole life (one dispatcher per
  layer that reads what the current call asks for from tensors, so a new coefficient is not a recompile), and
  compiles its *own* decode call: a code object of its own, ``fullgraph=True`` (a graph break would resume in
  code shared with other compiles), guards on hooks turned on (a hook added mid-session recompiles). transformers
  gets that call through ``get_compiled_call``, the method its ``generate`` asks for the compiled decode step.

Prefill runs eagerly (transformers compiles decode steps only; a test pins it), so the phase is decided there as
everywhere else; inside the compiled step nothing reads a value off the device (see :mod:`persona.hooks.phase`).
A compile that fails falls back to the static cache without compile, with one warning that names the cause.
"""

from __future__ import annotations

import logging
import types
from collections.abc import Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from persona.core.hardware import input_device
from persona.hooks import block_hooks, locate_blocks
from persona.hooks.registry import ForwardState
from persona.steering.ops import intervention_hooks
from persona.steering.spec import Spec, prepare_specs

log = logging.getLogger(__name__)

FAST_MODES = ("auto", "compile", "static", "off")
"""``compile``: static cache + compiled decode step; ``static``: static cache, eager; ``off``: dynamic cache,
eager (the plain path); ``auto``: ``compile`` on CUDA, ``off`` elsewhere (on a CPU the plain path is faster)."""


def fast_path_supported() -> str | None:
    """None where the fast path runs; else why not. It relies on transformers 5's static cache layers and on
    torch >= 2.6 compiling them (the compatibility window's oldest end, transformers 4.56 / torch 2.4, has neither)."""
    from importlib.metadata import version

    transformers_major = int(version("transformers").split(".")[0])
    torch_minor = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
    if transformers_major < 5 or torch_minor < (2, 6):
        return f"the fast path needs transformers >= 5 and torch >= 2.6 (found {version('transformers')}, {torch.__version__})"
    return None


def fast_mode(fast: Any, device: torch.device | str) -> str:
    """The mode a ``fast=`` value means on ``device``: True/False, a mode name, or a transformers ``CompileConfig``.

    ``auto`` falls back to the plain path where :func:`fast_path_supported` says no; an explicit mode is refused there.
    """
    if isinstance(fast, FastGenerator):
        return fast.mode
    if fast == "auto" and fast_path_supported() is not None:
        return "off"
    if fast not in (False, None, "off", "auto") and (why := fast_path_supported()) is not None:
        raise ValueError(f"fast={fast!r}: {why}. Fix: upgrade them, or use fast=False.")
    if fast is True:
        return "compile"
    if fast is False or fast is None:
        return "off"
    if type(fast).__name__ == "CompileConfig":
        return "compile"
    if fast not in FAST_MODES:
        raise ValueError(
            f"fast={fast!r}. Fix: use True, False, one of {', '.join(FAST_MODES)}, or a transformers CompileConfig."
        )
    if fast == "auto":
        return "compile" if torch.device(device).type == "cuda" else "off"
    return fast


def compile_config(fast: Any, device: torch.device | str):
    """The ``CompileConfig`` of the compiled decode step: the caller's, or inductor (``reduce-overhead`` on CUDA)."""
    from transformers import CompileConfig

    if type(fast).__name__ == "CompileConfig":
        config = CompileConfig(**fast.to_dict())
    elif torch.device(device).type == "cuda":
        config = CompileConfig()
    else:
        config = CompileConfig(mode="default")  # CUDA graphs need CUDA
    config.fullgraph = True  # a graph break would resume in frames compiled by others (see the module doc)
    config._compile_all_devices = True  # transformers compiles only on accelerators unless told otherwise
    return config


def _compiled_call(model: nn.Module, config) -> Any:
    """``model(...)`` compiled as a function of this session's own: no entry compiled elsewhere can match it."""

    def call(*args, **kwargs):
        return model(*args, **kwargs)

    # torch.compile keeps compiled code, and its recompile limit, per code object: a fresh copy per session means
    # nothing compiled under other hooks is reused here, and a finished session's entries go away with it.
    call = types.FunctionType(
        call.__code__.replace(), call.__globals__, call.__name__, None, call.__closure__
    )
    options = {"mode": config.mode} if config.options is None else {"options": config.options}
    compiled = torch.compile(call, fullgraph=True, dynamic=config.dynamic, backend=config.backend, **options)

    def run(*args, **kwargs):
        # Guard on module hooks as well: one attached or removed mid-session recompiles instead of being ignored.
        with torch._dynamo.config.patch(skip_nnmodule_hook_guards=False):
            return compiled(*args, **kwargs)

    return run


class FastGenerator:
    """A generation session on one model: static cache (+ compiled decode step), steering hooks attached once.

    ``with FastGenerator(model, "compile") as generator: generator.generate(input_ids, attention_mask, specs)``.
    One compile per session and batch shape (a new batch size or a longer prompt may add one); coefficients
    and directions change without recompiling, a new layer or positions mode recompiles. Each call's tokens
    equal :func:`persona.steering.steer` around a plain ``generate`` (tests: every architecture, every
    positions mode, left padding). Outside its ``with`` block the model has no hooks of the session.
    """

    def __init__(self, model: nn.Module, fast: Any = "compile"):
        device = input_device(model)
        self.mode = fast_mode(fast, device)
        if self.mode == "off":
            raise ValueError(
                "FastGenerator needs fast='compile' or 'static'. Fix: call generate_steered(fast=False)."
            )
        self.model = model
        self.layout = locate_blocks(model)
        self.config = compile_config(fast, device) if self.mode == "compile" else None
        self.state = ForwardState()
        self.active: dict[int, tuple] = {}  # layer -> this call's hook fns there
        self.fallback: str | None = None  # why the compiled path was given up, once it was
        self._hooks = ExitStack()
        self._open = False
        self._call = None

    def __enter__(self) -> FastGenerator:
        layers = range(self.layout.num_layers + 1)
        self._hooks.enter_context(
            block_hooks(self.model, [(layer, self._dispatcher(layer)) for layer in layers], state=self.state)
        )
        self._open = True
        return self

    def __exit__(self, *exc_info) -> None:
        self._hooks.close()
        self._open = False
        self._call = None

    def _dispatcher(self, layer: int):
        """The one hook at ``layer``: this call's hooks there, in the order :func:`persona.steering.steer` runs them."""

        def hook(hidden: Tensor, state: ForwardState) -> Tensor | None:
            fns = self.active.get(layer)
            if not fns:
                return None
            changed = None
            for fn in fns:
                new = fn(hidden if changed is None else changed, state)
                if new is not None:
                    changed = new
            return changed

        return hook

    def generate(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        specs: Sequence[Spec] = (),
        *,
        orthogonalise: bool = False,
        **generate_kwargs,
    ) -> Tensor:
        """``model.generate`` on a left-padded batch ``[batch, prompt_len]`` under ``specs`` (steering, caps,
        ablations, gated or not; ``orthogonalise``: see :func:`persona.steering.orthogonalise_specs`); returns
        its token ids."""
        if not self._open:
            raise RuntimeError(
                "FastGenerator.generate outside its with-block. Fix: `with FastGenerator(...) as g:`."
            )
        refused = sorted(
            {"prefill_chunk_size", "cache", "past_key_values", "cache_implementation"} & set(generate_kwargs)
        )
        if refused:
            raise ValueError(
                f"The fast generation path sets the cache itself and compiles decode steps only; got {refused}. "
                "Fix: drop them, or use fast=False."
            )
        active: dict[int, list] = {}
        # The very hook functions steer() registers (gate readers first, then entries in order): the same bits.
        for layer, fn in intervention_hooks(prepare_specs(self.layout, specs, orthogonalise=orthogonalise)):
            active.setdefault(layer, []).append(fn)
        self.active = {layer: tuple(entries) for layer, entries in active.items()}
        self.state.prompt_mask = attention_mask
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "cache_implementation": "static"}
        try:
            if self.mode == "compile" and self.fallback is None:
                try:
                    with self._compiled_decode():
                        return self.model.generate(**inputs, compile_config=self.config, **generate_kwargs)
                except torch._dynamo.exc.TorchDynamoException as error:
                    self._give_up_compile(error)
            return self.model.generate(**inputs, disable_compile=True, **generate_kwargs)
        finally:
            self.active = {}
            self.state.prompt_mask = None

    @contextmanager
    def _compiled_decode(self):
        """transformers' ``generate`` asks ``get_compiled_call`` for its decode step: hand it this session's."""
        base = self.layout.model  # the transformers model under any PEFT wrapper: the one whose generate runs
        if self._call is None:
            self._call = _compiled_call(base, self.config)
        call = self._call
        previous = base.__dict__.get("get_compiled_call")
        base.get_compiled_call = lambda compile_config=None: call
        try:
            yield
        finally:
            if previous is None:
                del base.get_compiled_call
            else:
                base.get_compiled_call = previous

    def _give_up_compile(self, error: Exception) -> None:
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        self.fallback = f"{type(error).__name__}: {first_line}"
        log.warning(
            "persona: torch.compile of the decode step failed (%s); generating with the static cache without "
            "compile from here on. Fix: pass fast='static' to skip the attempt, or fast=False for the plain path "
            "(PERSONA_DEBUG=1 or TORCH_LOGS=graph_breaks shows why it failed).",
            self.fallback,
        )
