"""Steering at inference: what to add where (``spec``: :class:`SteeringSpec` and :func:`steer`), different
interventions per row of one batch (``rows``), caps, ablations and gates (``interventions``, applied by ``ops``), whole steered replies (``generate``) and the static-cache compiled
decode (``fast``).

May import: ``core``, ``models``, ``hooks``, ``data`` (chat rendering, batching). Operators live in
``persona.hooks.operators``; steering only decides where and how strongly they apply.
"""

from persona.steering.generate import check_room, generate_steered
from persona.steering.interventions import AblationSpec, CapSpec, Gate
from persona.steering.ops import PreparedSpec, steered_positions
from persona.steering.rows import RowInterventions, steer_rows
from persona.steering.spec import SteeringSpec, orthogonalise_specs, prepare_specs, steer

__all__ = [
    "AblationSpec",
    "CapSpec",
    "Gate",
    "orthogonalise_specs",
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
