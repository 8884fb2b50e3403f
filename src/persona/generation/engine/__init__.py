"""Continuous batching with per-request persona interventions (issue #23): :class:`Engine`.

``persona serve`` schedules through it (:mod:`persona.serve.continuous`); ``persona generate`` does not yet.
"""

from persona.generation.engine.core import Engine
from persona.generation.engine.plan import PlanError, Segment
from persona.generation.engine.requests import EngineConfig, EngineRequest, EngineResult

__all__ = ["Engine", "EngineConfig", "EngineRequest", "EngineResult", "PlanError", "Segment"]
