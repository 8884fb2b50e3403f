"""Continuous batching with per-request persona interventions (issue #23): :class:`Engine`.

``persona serve`` schedules through it (:mod:`persona.serve.continuous`), and so does ``persona generate``
(:mod:`persona.generation.on_engine`).
"""

from persona.generation.engine.core import Engine
from persona.generation.engine.plan import PlanError, Segment
from persona.generation.engine.requests import EngineConfig, EngineRequest, EngineResult

__all__ = ["Engine", "EngineConfig", "EngineRequest", "EngineResult", "PlanError", "Segment"]
