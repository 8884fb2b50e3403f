"""Continuous batching with per-request persona interventions (issue #23): :class:`Engine`.

``persona generate`` runs on it (:mod:`persona.generation.on_engine`); ``persona serve`` still uses the static path.
"""

from persona.generation.engine.core import Engine
from persona.generation.engine.plan import PlanError, Segment
from persona.generation.engine.requests import EngineConfig, EngineRequest, EngineResult

__all__ = ["Engine", "EngineConfig", "EngineRequest", "EngineResult", "PlanError", "Segment"]
