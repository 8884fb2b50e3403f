"""Models split across devices (``device_map``) inside Lightning's predict loops.

Lightning moves a LightningModule, and everything in it, to one device, and sends batches there. A model that
accelerate spread over several GPUs (``device_map="auto"``, for a model larger than one) must stay where it was
placed: :class:`KeepsDevicePlacement` leaves it alone when the module is moved, and the DataModule sends batches to
:func:`batch_device`, its input embeddings' device; each block's hooks then read the residual stream on that
block's device. (The batch hook belongs to the DataModule: Lightning uses a DataModule's and warns about a
LightningModule's.)
"""

from __future__ import annotations

from persona.core.hardware import input_device
from persona.hooks import unwrap_model


def split_across_devices(model) -> bool:
    """Whether accelerate placed ``model``'s modules on more than one device."""
    device_map = getattr(unwrap_model(model), "hf_device_map", None) or {}
    return len({str(device) for device in device_map.values()}) > 1


class KeepsDevicePlacement:
    """Mixin for a LightningModule whose ``self.model`` may be placed across devices by ``device_map``; its batches
    come from :class:`persona.data.modules.ExampleDataModule`, which sends them to :func:`batch_device`."""

    def _apply(self, fn, recurse=True):
        model = self._modules.get("model")
        if model is None or not split_across_devices(model):
            return super()._apply(fn, recurse)
        self._modules["model"] = None  # moved by nobody: accelerate placed it
        try:
            return super()._apply(fn, recurse)
        finally:
            self._modules["model"] = model


def batch_device(lightning_module, device):
    """Where a batch goes: Lightning's ``device``, or the input embeddings' of a model placed across devices."""
    model = getattr(lightning_module, "_modules", {}).get("model")
    if model is not None and split_across_devices(model):
        return input_device(model)
    return device
