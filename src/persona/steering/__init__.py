"""Steering at inference: what to add where (``spec``: :class:`SteeringSpec` and :func:`steer`), different
interventions per row of one batch (``rows``), whole steered replies (``generate``) and the static-cache compiled
decode (``fast``).

May import: ``core``, ``models``, ``hooks``, ``data`` (chat rendering, batching). Operators live in
``persona.hooks.operators``; steering only decides where and how strongly they apply.
"""

from persona.steering.generate import check_room, generate_steered
from persona.steering.rows import RowInterventions, steer_rows
from persona.steering.spec import PreparedSpec, SteeringSpec, prepare_specs, steer, steered_positions

__all__ = [
    "PreparedSpec",
    "RowInterventions",
    "SteeringSpec",
    "check_room",
    "generate_steered",
    "prepare_specs",
    "steer",
    "steer_rows",
    "steered_positions",
]
