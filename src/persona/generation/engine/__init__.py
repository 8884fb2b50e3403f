"""Continuous batching with per-request persona interventions (issue #23): :class:`Engine`.

Not wired into ``persona serve`` or ``persona generate`` yet; both still use the static path.
"""

from persona.generation.engine.core import Engine
from persona.generation.engine.plan import PlanError, Segment
from persona.generation.engine.requests import EngineConfig, EngineRequest, EngineResult

__all__ = ["Engine", "EngineConfig", "EngineRequest", "EngineResult", "PlanError", "Segment"]
