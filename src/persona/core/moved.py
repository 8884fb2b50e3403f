"""Modules that moved when the flat layout became packages stay importable under their old names.

Users' configs name classes by path (``class_path: persona.extraction.VectorExtractor``) and notebooks import
modules (``from persona.chat import render_chat``); both keep working, with a DeprecationWarning that says the new
path. An old name is a thin module whose attributes are the new module's, so ``isinstance`` and identity hold.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

MOVED = {
    "persona.activations": "persona.vectors.activations",
    "persona.chat": "persona.data.chat",
    "persona.checks": "persona.core.checks",
    "persona.constants": "persona.core.constants",
    "persona.errors": "persona.core.errors",
    "persona.extraction": "persona.vectors.extraction",
    "persona.fast_generation": "persona.steering.fast",
    "persona.generation_loop": "persona.generation.predict_loop",
    "persona.gguf_export": "persona.vectors.gguf",
    "persona.hardware": "persona.core.hardware",
    "persona.placement": "persona.hooks.placement",
    "persona.projection": "persona.vectors.projection",
    "persona.report": "persona.study.records",
    "persona.row_steering": "persona.steering.rows",
    "persona.signals": "persona.core.signals",
    "persona.steer_eval": "persona.commands.steer_eval",
    "persona.store": "persona.core.store",
    "persona.traits": "persona.data.traits",
    "persona.vector_file": "persona.vectors.reader",
    "persona.commands.study": "persona.study.command",
}


class MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Answers imports of :data:`MOVED`'s old names with a module that forwards to the new one."""

    def find_spec(self, fullname, path=None, target=None):
        return importlib.util.spec_from_loader(fullname, self) if fullname in MOVED else None

    def exec_module(self, module) -> None:
        new = MOVED[module.__name__]
        warnings.warn(
            f"{module.__name__} moved to {new}; import it from there (the old name will go).",
            DeprecationWarning,
            stacklevel=2,
        )
        target = importlib.import_module(new)
        module.__getattr__ = lambda name: getattr(target, name)
        module.__all__ = getattr(target, "__all__", [n for n in vars(target) if not n.startswith("_")])
        module.__doc__ = target.__doc__


def install() -> None:
    if not any(isinstance(finder, MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.append(MovedModuleFinder())
