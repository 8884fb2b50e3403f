"""The engine: transformers' continuous batching with per-request persona interventions, sampling and read-outs.

Scheduling is transformers' (``ContinuousBatchingManager``): requests join the running batch at the next step
and leave it the step they finish; a long prompt is prefilled in chunks alongside decoding requests; the paged
KV cache is bounded by :class:`EngineConfig`. This module adds what persona needs on top:

- every forward, before block 0, a plan maps each packed token to its request and phase from the scheduler's
  state, cross-checked against the forward (:mod:`.plan`), and the hooks apply each request's own interventions
  (:mod:`.steps`) through :func:`persona.hooks.block_hooks`;
- each sampled request draws with its own generator (``ModelRunner._sample`` is replaced on the instance), so a
  seeded reply does not depend on its batch mates; the same replacement holds a request's stop tokens off until
  its ``min_new_tokens``;
- a ``stream`` request's tokens so far are readable every step (:meth:`Engine.partial`);
- prefix sharing is off (it would reuse KV computed under another request's steering), CUDA graphs and async
  batching are off (hooks run in Python each step);
- a request too large for the cache is refused when submitted; if a forward raises (a plan disagreement, a
  hook error), transformers fails every request in flight: each gets ``status="failed"`` with the reason and
  the engine starts a fresh manager for the next ones.
"""

from __future__ import annotations

import itertools
import secrets
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack

import torch
from torch import Tensor, nn

from persona.generation.engine.compat import (  # noqa: F401  (engine.core.X, as before the split: tests, callers)
    MIN_TRANSFORMERS,
    UNSUPPORTED,
    cb_config,
    check_transformers,
    unavailable,
)
from persona.generation.engine.plan import PlanError, check_segments, scheduled_segments
from persona.generation.engine.requests import EngineConfig, EngineRequest, EngineResult
from persona.generation.engine.steps import Live, apply_plan, build_plan, gate_probe, needs_probe
from persona.generation.sampling import sample_token
from persona.hooks import block_hooks, locate_blocks
from persona.hooks.layers import check_layer, hidden_size
from persona.hooks.registry import ForwardState
from persona.steering import PreparedSpec
from persona.steering.rows import check_ablations
from persona.steering.spec import prepare_indexed

_WAKE = object()  # put on the manager's output queue by wake(): ends a poll() that waits
PROBE = "#gate-probe"  # suffix of a gate probe's id in the manager (see .steps.gate_probe)


class Engine:
    """Submit :class:`EngineRequest`s, collect :class:`EngineResult`s; ``close()`` (or ``with``) when done."""

    def __init__(
        self,
        model: nn.Module,
        config: EngineConfig | None = None,
        on_forward: Callable[[int], None] | None = None,
    ):
        """``on_forward``: called with the number of requests in each forward, from the engine's thread."""
        check_transformers()
        model_type = getattr(model.config, "model_type", "")
        if model_type in UNSUPPORTED:
            raise ValueError(
                f"The engine cannot run {model_type}: {UNSUPPORTED[model_type]}. Fix: use the static path "
                "(persona.steering.generate_steered)."
            )
        self.model, self.config, self.on_forward = model, config or EngineConfig(), on_forward
        self.layout = locate_blocks(model)
        self.width = hidden_size(self.layout)
        self.steps = 0
        self.restarts = 0
        self._live: dict[str, Live] = {}
        self._partial: dict[str, list[int]] = {}
        self._unreported: list[str] = []  # done (e.g. failed by a restart), not yet returned by poll()
        self._probing: dict[str, EngineRequest] = {}  # request id -> the request, while its gate probe runs
        self._done: dict[str, EngineResult] = {}
        self._ids = itertools.count()
        self._plan: dict = {}
        self._hooks = ExitStack()
        self._hooks.enter_context(block_hooks(model, self._hook_fns()))
        self._manager = None
        self._thread = None
        self._start()

    # ------------------------------------------------------------------ lifecycle
    def _start(self) -> None:
        from transformers import GenerationConfig
        from transformers.generation.continuous_batching.model_runner import infer_max_single_request_tokens

        generation = GenerationConfig(max_new_tokens=1, do_sample=False, eos_token_id=-1, pad_token_id=0)
        manager = self.model.init_continuous_batching(
            generation_config=generation, continuous_batching_config=cb_config(self.config)
        )
        manager.warmup()  # creates the batch processor here, so its sampler can be replaced before start()
        processor = manager.batch_processor
        processor.model_runner._sample = self._sampler(processor)
        self.max_request_tokens = infer_max_single_request_tokens(processor.cache)
        self._manager = manager
        manager.start()
        self._thread = manager._generation_thread  # the forwards this engine plans for run there

    def close(self) -> None:
        if self._manager is not None:
            self._manager.stop(block=True)
            self._manager.destroy()
            self._manager = None
        self._hooks.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _recover(self, error: BaseException) -> None:
        """The manager's thread died: fail what it did not deliver, then start a fresh manager."""
        self._probing.clear()
        self._partial.clear()
        for request_id in list(self._live):
            self._live.pop(request_id)
            if request_id.endswith(PROBE):
                continue
            self._unreported.append(request_id)
            self._done[request_id] = EngineResult(
                request_id, [], "failed", error=f"the engine stopped: {type(error).__name__}: {error}"
            )
        self._manager.stop(block=True)
        self._manager.destroy()
        self.restarts += 1
        self._start()

    # ------------------------------------------------------------------ requests
    def submit(self, request: EngineRequest, request_id: str | None = None) -> str:
        """Queue ``request``; it joins the running batch at the next step. Returns its id."""
        if self._manager is None:
            raise RuntimeError("The engine is closed. Fix: submit to a new Engine.")
        live = self._prepare(request)
        request_id = f"engine-{next(self._ids)}" if request_id is None else request_id
        if request_id in self._live or request_id in self._done:
            raise ValueError(f"request_id={request_id!r} is in use. Fix: pass a new id or None.")
        self._check_running()
        self._live[request_id] = live
        if needs_probe(live):  # its gates are read first, by a probe of its prompt (see .steps)
            self._probing[request_id] = request
            self._live[request_id + PROBE] = gate_probe(live)
            self._add(request_id + PROBE, EngineRequest(request.prompt, 1))
        else:
            self._add(request_id, request)
        return request_id

    def _add(self, request_id: str, request: EngineRequest) -> None:
        stops = [int(token) for token in request.stop_token_ids] or -1
        for attempt in range(2):
            accepted = self._manager.add_request(
                list(request.prompt),
                request_id=request_id,
                max_new_tokens=request.max_new_tokens,
                eos_token_id=stops,
                streaming=request.stream,
            )
            if accepted is not None or attempt or self._manager.background_thread_status.fatal_error is None:
                break
            self._restart_keeping(request_id)  # the manager died under us: start afresh, then add this one
        if accepted is None:
            self._live.pop(request_id.removesuffix(PROBE))
            self._live.pop(request_id, None)
            raise RuntimeError("The engine is stopping and accepts no requests. Fix: submit to a new Engine.")

    def _restart_keeping(self, request_id: str) -> None:
        """Deliver what the dead manager finished, fail what it had in flight, start a new one; ``request_id``
        (being added now) is kept out of it."""
        base = request_id.removesuffix(PROBE)
        keep = {key: self._live.pop(key) for key in {request_id, base} if key in self._live}
        probing = self._probing.pop(base, None)
        self._unreported += self.poll(0)
        self._live.update(keep)
        if probing is not None:
            self._probing[base] = probing

    def _probed(self, probe_id: str, status: str, error: str | None) -> str | None:
        """A gate probe ended: its request starts with the decisions, or fails with the probe (returns its id)."""
        request_id = probe_id.removesuffix(PROBE)
        probe, request = self._live.pop(probe_id), self._probing.pop(request_id)
        live = self._live.get(request_id)
        if live is None:  # cancelled meanwhile
            return None
        error = error or probe.error
        if status != "finished" or error:
            self._live.pop(request_id)
            self._done[request_id] = self._result(request_id, live, [], "failed", f"its gate probe: {error}")
            return request_id
        live.fired.update(probe.fired)
        self._add(request_id, request)
        return None

    def cancel(self, request_id: str) -> None:
        """Stop ``request_id`` now: its cache pages are freed at the next step, its result is ``cancelled``."""
        live = self._live.pop(request_id, None)
        if live is None:
            return
        if self._probing.pop(request_id, None) is not None:
            self._live.pop(request_id + PROBE, None)
            request_id_in_manager = request_id + PROBE
        else:
            request_id_in_manager = request_id
        self._manager.cancel_request(request_id_in_manager)
        self._done[request_id] = self._result(
            request_id, live, self._partial.pop(request_id, []), "cancelled"
        )

    def partial(self, request_id: str) -> list[int]:
        """The tokens of a ``stream`` request so far (as of the last :meth:`poll`); [] before its first."""
        return self._partial.get(request_id, [])

    def load(self) -> tuple[int, float]:
        """(requests waiting for their first step, share of the KV cache's pages in use): read, not locked;
        (0, 0.0) once closed."""
        if self._manager is None:
            return 0, 0.0
        processor = self._manager.batch_processor
        waiting = len(processor.scheduler.waiting_requests) + self._manager.input_queue.qsize()
        held = [  # pages held by requests in flight (freed pages can sit in the pool before it counts them free)
            sum(len(blocks) for blocks in list(allocator.block_table.values())) / allocator.num_blocks
            for allocator in list(processor.cache.cache_allocators.values())
        ]
        return waiting, max(held, default=0.0)

    @staticmethod
    def _result(request_id: str, live: Live, tokens, status: str, error: str | None = None) -> EngineResult:
        return EngineResult(
            request_id, list(tokens), status, error, live.stacked_readings(), dict(live.fired)
        )

    def result(self, request_id: str, timeout: float | None = None) -> EngineResult:
        """Wait for ``request_id`` to finish (or fail, or be cancelled) and return its result."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while request_id not in self._done:
            if request_id not in self._live:
                raise KeyError(f"request_id={request_id!r} was never submitted (or its result was taken).")
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"request {request_id!r} did not finish within {timeout} s")
            self.poll(0.05)
        return self._done.pop(request_id)

    def wake(self) -> None:
        """End a :meth:`poll` that is waiting now (or the next one) at once; safe from any thread."""
        self._manager.output_router.output_queue.put(_WAKE)

    def poll(self, timeout: float = 0.0) -> list[str]:
        """Collect what finished (waiting up to ``timeout`` s for one); returns the ids that finished."""
        finished = []
        output = self._manager.get_result(timeout=timeout)
        while output is not None:
            if output is _WAKE:
                output = self._manager.get_result(timeout=0)
                continue
            request_id = output.request_id
            if output.is_finished() and request_id.endswith(PROBE) and request_id in self._live:
                status = "failed" if output.error else "finished"
                finished += [done for done in [self._probed(request_id, status, output.error)] if done]
            elif output.is_finished() and request_id in self._live:
                live = self._live.pop(request_id)
                self._partial.pop(request_id, None)
                error = output.error or live.error  # the plan's refusal wins over a finish it raced with
                status = "failed" if error else "finished"
                self._done[request_id] = self._result(
                    request_id, live, output.generated_tokens, status, error
                )
                finished.append(request_id)
            elif request_id in self._live:
                self._partial[request_id] = list(output.generated_tokens)
            output = self._manager.get_result(timeout=0)
        finished += self._fail_unplannable()
        self._check_running()
        finished += self._unreported
        self._unreported = []
        return finished

    def _fail_unplannable(self) -> list[str]:
        """Requests the plan refused (a gate it could not decide in time): cancelled, failed with the reason."""
        failed = []
        for request_id in [key for key, live in self._live.items() if live.error is not None]:
            live = self._live[request_id]
            self._manager.cancel_request(request_id)
            if request_id.endswith(PROBE):
                failed += [done for done in [self._probed(request_id, "failed", live.error)] if done]
                continue
            self._live.pop(request_id)
            self._done[request_id] = self._result(request_id, live, [], "failed", live.error)
            failed.append(request_id)
        return failed

    def _check_running(self) -> None:
        status = self._manager.background_thread_status
        if status.fatal_error is not None and self._manager.output_router.output_queue.empty():
            self._recover(status.fatal_error)

    def _prepare(self, request: EngineRequest) -> Live:
        _check_request(request, self.max_request_tokens)
        rows = request.interventions
        specs = prepare_indexed(
            self.layout, rows.specs, what="interventions.specs", orthogonalise=rows.orthogonalise
        )
        check_ablations(self.layout, [rows], self.width)
        entries: dict[int, list[tuple[int, PreparedSpec]]] = {}
        for layer, basis in rows.ablations.items():
            placed = basis.detach().to(self.layout.layer_device(layer), torch.float32)
            entries.setdefault(layer, []).append((-1, PreparedSpec(layer, "all", placed, kind="ablate")))
        for index, spec in specs:
            entries.setdefault(spec.layer, []).append((index, spec))
        monitor = {}
        for layer, directions in request.monitor.items():
            check_layer(self.layout, layer, what="monitor layer")
            monitor[layer] = (
                directions.detach().to(self.layout.layer_device(layer), torch.float32).reshape(-1, self.width)
            )
        generator = None
        if request.temperature > 0:
            seed = request.seed if request.seed is not None else secrets.randbits(63)
            generator = torch.Generator().manual_seed(seed % 2**63)
        stops = torch.tensor(sorted({int(t) for t in request.stop_token_ids}), dtype=torch.long)
        return Live(
            entries, monitor, request.temperature, request.top_p, generator,
            min_new_tokens=request.min_new_tokens, stop_ids=stops,
        )  # fmt: skip

    # ------------------------------------------------------------------ hooks (run in the manager's thread)
    def _hook_fns(self) -> list:
        fns = [(0, self._build_plan)]
        for layer in range(self.layout.num_layers + 1):
            fns.append((layer, self._layer_hook(layer)))
        return fns

    def _build_plan(self, hidden: Tensor, state: ForwardState) -> None:
        if threading.current_thread() is not self._thread:
            return None  # a plain forward, or another engine's on the same model: not this engine's to plan
        self._plan = {}
        if state.packed is None:
            return None
        segments = scheduled_segments(self._manager.batch_processor.inputs_and_outputs.requests_in_batch)
        if self.config.check_forward:
            check_segments(segments, state.packed, hidden.shape[1])
        self.steps += 1
        if self.on_forward is not None:
            self.on_forward(len(segments))
        self._plan = build_plan(segments, self._live, hidden.shape[1], self.width, self.layout.layer_device)
        return None

    def _layer_hook(self, layer: int):
        def hook(hidden: Tensor, state: ForwardState) -> Tensor | None:
            if threading.current_thread() is not self._thread:
                return None
            layer_plan = self._plan.get(layer)
            return None if layer_plan is None else apply_plan(layer_plan, layer, hidden)

        return hook

    def _sampler(self, processor):
        def sample(scores: Tensor, output_ids: Tensor) -> None:
            batch = processor.inputs_and_outputs.requests_in_batch
            rows = [future.state.request_id for future in batch if future.has_new_token]
            logits = scores[0]
            if logits.shape[0] < len(rows):
                raise PlanError(f"{logits.shape[0]} logit rows for {len(rows)} requests with a new token")
            lives = [self._live.get(request_id) for request_id in rows]
            for index, live in enumerate(
                lives
            ):  # stop tokens held off until min_new_tokens, as generate does
                if live is not None and live.generated < live.min_new_tokens and len(live.stop_ids):
                    logits[index, live.stop_ids.to(logits.device)] = float("-inf")
            tokens = logits.argmax(dim=-1)
            for index, live in enumerate(lives):
                if live is not None and live.generator is not None:
                    tokens[index] = sample_token(logits[index], live.temperature, live.top_p, live.generator)
                if live is not None:
                    live.generated += 1
            output_ids[0, : tokens.shape[0]].copy_(tokens)

        return sample


def _check_request(request: EngineRequest, room: int) -> None:
    if len(request.prompt) == 0:
        raise ValueError("EngineRequest.prompt is empty. Fix: pass at least one token id.")
    if not isinstance(request.max_new_tokens, int) or request.max_new_tokens < 1:
        raise ValueError(
            f"EngineRequest.max_new_tokens={request.max_new_tokens!r}. Fix: pass an integer >= 1."
        )
    if (
        not isinstance(request.min_new_tokens, int)
        or not 0 <= request.min_new_tokens <= request.max_new_tokens
    ):
        raise ValueError(
            f"EngineRequest.min_new_tokens={request.min_new_tokens!r}. Fix: an integer from 0 to max_new_tokens."
        )
    if request.temperature < 0 or not 0 < request.top_p <= 1:
        raise ValueError(
            f"EngineRequest.temperature={request.temperature}, top_p={request.top_p}. Fix: temperature >= 0 "
            "(0 = greedy) and 0 < top_p <= 1."
        )
    total = len(request.prompt) + request.max_new_tokens
    if total > room:
        raise ValueError(
            f"EngineRequest: prompt ({len(request.prompt)} tokens) + max_new_tokens ({request.max_new_tokens}) = "
            f"{total} exceeds the {room} tokens one request can hold in this engine's cache. Fix: raise "
            "EngineConfig.num_blocks (or page_size), or lower max_new_tokens."
        )
