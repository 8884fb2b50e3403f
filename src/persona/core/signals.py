"""SIGTERM stops a Lightning loop at the next batch and the process exits 143, as a killed one would.

Lightning's signal connector catches SIGTERM and sets ``trainer.received_sigterm``, but only the fit and
evaluation loops act on it (raising :class:`SIGTERMException`, a ``SystemExit`` whose status is 0): a predict loop
logged "Received SIGTERM" and ran to its end, so ``timeout``, ``kill``, systemd and SLURM preemption could not stop
extract, project, layers or generate, and a stopped ``fit`` reported success. :class:`StopOnSigterm` ends a
predict loop before its next batch (outputs written per batch, as generate's journal, stay resumable; outputs
written at the end are not written), and the ``persona`` entry point turns either loop's exception into one line and
exit status 143 (:func:`persona.core.errors.stopped_by_sigterm`).
"""

from __future__ import annotations

from lightning.pytorch import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException

from persona.core.errors import SIGTERM_EXIT


class StopOnSigterm(Callback):
    """Ends a predict loop before its next batch once SIGTERM has arrived (Lightning only notes it there)."""

    def on_predict_batch_start(
        self, trainer, pl_module, batch, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if trainer.received_sigterm:
            raise SIGTERMException(SIGTERM_EXIT)
