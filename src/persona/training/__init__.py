"""LoRA fine-tuning: the LightningModule, the chat-JSONL DataModule and the callbacks that steer (preventative
steering), ablate (CAFT), cap (projection capping) and monitor projections while it trains.

May import: ``core``, ``models``, ``hooks``, ``data``, ``vectors``, ``steering``.
"""

from persona.training.callbacks import ConceptAblation, PreventativeSteering, ProjectionCapping
from persona.training.data import ChatCollator, ChatDataModule, read_chat_jsonl, tokenize_conversation
from persona.training.module import (
    SEED_TARGET_MODULES,
    LoRAFineTune,
    check_target_modules,
    linear_module_names,
)
from persona.training.monitor import ActivationMonitor

# The README names the callbacks by their short names: persona.training.<Name> resolves in a config's class_path.
__all__ = [
    "ActivationMonitor",
    "ConceptAblation",
    "PreventativeSteering",
    "ProjectionCapping",
    "SEED_TARGET_MODULES",
    "ChatDataModule",
    "LoRAFineTune",
    "check_target_modules",
    "ChatCollator",
    "linear_module_names",
    "read_chat_jsonl",
    "tokenize_conversation",
]
