"""What a user sees when something is wrong: one line that names the input, the field and the fix.

Commands raise :class:`PersonaError` (or the library errors listed in :data:`USER_ERRORS`, whose
messages the project writes the same way); the ``persona`` entry point prints
``persona <command>: error: <message>`` and exits 1. The traceback is shown only with ``PERSONA_DEBUG=1``.
"""

from __future__ import annotations

import json
import sys


class PersonaError(ValueError):
    """A bad input, setting or state the user can fix; the message says where and how."""


class MissedResult(PersonaError):
    """A step ran on valid input but its science gave no result (no pair kept, no score, no held-out data):
    a study records the phase as missed and goes on; a single command reports it like any error."""


class NoPairsLeft(MissedResult):
    """The score filter kept no pair of responses (a weak judge, or a high threshold)."""


class StudyIncomplete(PersonaError):
    """The study finished and wrote its report, but some results it was asked for were missed."""

    exit_code = 4


# Expected failures with messages written for users (ours, or the standard library's naming the path).
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, json.JSONDecodeError)


# How jsonargparse (under LightningCLI) wraps an error raised while it instantiates a config's classes:
# the wrapper's text is a dump of the namespace, the user's message is its cause.
WRAPPER_PREFIXES = ("Does not validate against any of the Union subtypes", "Problem with given class_path")


def user_facing(error: BaseException) -> BaseException:
    """The error whose message is meant for the user: wrappers that only re-raise with a dump are skipped."""
    while isinstance(error.__cause__, Exception) and str(error).startswith(WRAPPER_PREFIXES):
        error = error.__cause__
    return error


def union_member_error(message: str) -> str | None:
    """The one error of a union wrapper's ``Errors:`` list that is not "it is not None" (jsonargparse lists the
    real one there; older releases chain the None member's error as the cause, not the real one)."""
    if not message.startswith(WRAPPER_PREFIXES):
        return None
    listed = [line.strip()[2:] for line in message.splitlines() if line.strip().startswith("- ")]
    real = [item for item in listed if not item.startswith("Expected a <class 'NoneType'>")]
    return real[0] if len(real) == 1 else None


def one_line(error: BaseException) -> str:
    """The error's message on one line (library messages sometimes span several)."""
    text = " ".join((union_member_error(str(error)) or str(user_facing(error))).split())
    if isinstance(error, OSError) and error.filename and str(error.filename) not in text:
        text = f"{text}: {error.filename}"
    return text or type(error).__name__


# What a shell reports for a process that SIGTERM ended (128 + the signal's number): a stopped loop exits with it.
SIGTERM_EXIT = 128 + 15


def stopped_by_sigterm(error: BaseException) -> bool:
    """Whether ``error`` is a Lightning loop's SIGTERM exit (see :mod:`persona.core.signals`); Lightning is not imported."""
    exceptions = sys.modules.get("lightning.pytorch.utilities.exceptions")
    return exceptions is not None and isinstance(error, exceptions.SIGTERMException)
