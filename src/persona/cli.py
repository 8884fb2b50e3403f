"""The ``persona`` command: LightningCLI for fit/predict, typed functions for the pipeline steps.

Each pipeline step is one function whose signature is its flag schema (jsonargparse); flag names
follow the seed research scripts (``--pos_path``, ``--vector_path``, ``--layer`` ...).
"""

from __future__ import annotations

import collections.abc
import importlib
import inspect
import json
import logging
import os
import re
import sys
import types
import typing
import warnings
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Subcommand:
    summary: str
    target: str  # "module:function", imported only when run ("lightning" for LightningCLI)


LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")

SUBCOMMANDS: dict[str, Subcommand] = {
    "fit": Subcommand(
        "LoRA fine-tuning with steering/CAFT/monitor callbacks (LightningCLI, -c configs/fit/*.yaml)",
        "lightning",
    ),
    "predict": Subcommand(
        "Extraction / projection / generation predict loops (LightningCLI, -c configs/predict/*.yaml)",
        "lightning",
    ),
    "generate": Subcommand(
        "Persona-prompted responses scored by a judge, CSV out (was eval_persona)",
        "persona.commands.generate:generate",
    ),
    "traits": Subcommand(
        "List trait artifacts, or write a new trait's with an LLM", "persona.commands.traits:traits"
    ),
    "extract": Subcommand(
        "Persona vectors from pos/neg CSVs or contrastive pairs (was generate_vec)",
        "persona.commands.extract:extract",
    ),
    "project": Subcommand(
        "Project activations of a CSV/JSONL dataset on vectors (was cal_projection)",
        "persona.commands.project:project",
    ),
    "steer-eval": Subcommand(
        "Judge trait and coherence of steered answers over a coefficient grid",
        "persona.commands.steer_eval:steer_eval",
    ),
    "calibrate": Subcommand(
        "Per layer, the steering dose at a coherence target (TA@C80); recommend a layer and dose",
        "persona.commands.calibrate:calibrate",
    ),
    "personality": Subcommand(
        "Judge-free TRAIT personality scores (likelihood, multiple choice) over steering coefficients",
        "persona.commands.personality:personality",
    ),
    "layers": Subcommand(
        "Per-layer AUC, separation and variance; recommend a layer (CSV + PNG)",
        "persona.commands.layers:layers",
    ),
    "screen": Subcommand(
        "Screen training data by projection difference before training", "persona.commands.screen:screen"
    ),
    "shift": Subcommand(
        "Finetuning shift along a persona vector vs trait score", "persona.commands.shift:shift"
    ),
    "dataset": Subcommand(
        "Build chat JSONL training sets mixing trait-eliciting and normal samples",
        "persona.data.build:dataset",
    ),
    "export-gguf": Subcommand(
        "Export vectors as a llama.cpp control vector", "persona.vectors.gguf:export_gguf"
    ),
    "report": Subcommand(
        "Rewrite report.md of a demo run directory from its results.json", "persona.study.report:report"
    ),
    "study": Subcommand(
        "The whole method on your model, judge and hardware (-c configs/study/*.yaml); report.md",
        "persona.study.command:study",
    ),
    "demo": Subcommand(
        "The whole method on the embedded model, offline; writes a report", "persona.study.command:demo"
    ),
    "serve": Subcommand(
        "OpenAI-compatible server: per-request steering/ablation, per-reply trait monitoring, batching",
        "persona.serve.cli:serve",
    ),
    "education": Subcommand(
        "ASAP-SAS study: steered students and steered graders (QWK)", "persona.education.cli:education"
    ),
}


def usage() -> str:
    width = max(len(name) for name in SUBCOMMANDS)
    lines = [
        "usage: persona <command> [options]   (persona <command> --help for its flags)",
        "",
        "Find, monitor and control character traits of language models as persona vectors.",
        "",
        "commands:",
    ]
    for name, sub in SUBCOMMANDS.items():
        lines.append(f"  {name:<{width}}  {sub.summary}")
    lines += ["", "The default model is the embedded SmolLM2-135M-Instruct (--model smollm2-135m)."]
    return "\n".join(lines)


def check_config_files(argv: list[str]) -> None:
    """``-c/--config`` files exist and are YAML, answered before Lightning loads (it takes seconds)."""
    import yaml

    from persona.core.errors import PersonaError

    for position, token in enumerate(argv):
        flag, has_value, value = token.partition("=")
        if flag not in ("-c", "--config"):
            continue
        if not has_value:
            value = argv[position + 1] if position + 1 < len(argv) else ""
        path = Path(value)
        if not path.is_file():
            raise PersonaError(
                f"{flag} {value}: no such config file. Fix: check the path (configs/ has examples)."
            )
        try:
            config = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as error:
            where = getattr(error, "problem_mark", None)
            line = f" (line {where.line + 1})" if where is not None else ""
            raise PersonaError(
                f"{flag} {value}: not a YAML file{line}: {getattr(error, 'problem', None) or error}. "
                "Fix: correct the file (indentation, quotes, colons)."
            ) from error
        for field, class_path in class_paths(config):
            if not importable(class_path):
                raise PersonaError(
                    f"{flag} {value}: {field}.class_path {class_path!r} does not resolve. Fix: {class_hint(class_path)}"
                )


def class_paths(config, field: str = "") -> list[tuple[str, str]]:
    """(field, value) of every dotted ``class_path`` in a parsed config, e.g. ``("trainer.callbacks[0]", "a.B")``."""
    found = []
    if isinstance(config, dict):
        value = config.get("class_path")
        if isinstance(value, str) and "." in value:
            found.append((field or "config", value))
        for key, item in config.items():
            found += class_paths(item, f"{field}.{key}" if field else str(key))
    elif isinstance(config, list):
        for index, item in enumerate(config):
            found += class_paths(item, f"{field}[{index}]")
    return found


def importable(class_path: str) -> bool:
    module, _, name = class_path.rpartition(".")
    try:
        return hasattr(importlib.import_module(module), name)
    except ImportError:
        return False


# Where persona's pluggable classes (modules, data modules, callbacks) live, for a hint at a misspelt class_path.
PLUGGABLE_MODULES = (
    "persona.training", "persona.training.callbacks", "persona.training.monitor", "persona.data.modules",
    "persona.vectors.extraction", "persona.vectors.projection", "persona.generation.predict_loop", "persona.steering.fast",
)  # fmt: skip


def class_hint(class_path: str) -> str:
    import difflib

    name = class_path.rpartition(".")[2]
    known = {
        f"{module}.{attr}"
        for module in PLUGGABLE_MODULES
        for attr, obj in vars(importlib.import_module(module)).items()
        if inspect.isclass(obj) and obj.__module__.startswith("persona.")
    }
    same_name = sorted(path for path in known if path.rpartition(".")[2] == name)
    close = same_name or difflib.get_close_matches(class_path, sorted(known), n=1, cutoff=0.6)
    return f"use {close[0]}." if close else "check the module and class name (configs/ has examples)."


class DropLightningTips(logging.Filter):
    """Lightning logs an advertisement ("💡 Tip: ...") each time a Trainer starts; persona's users don't need it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡")


def quiet_upstream() -> None:
    """Silence only what libraries print about themselves, never a warning about persona's own use of them:
    Lightning's "💡 Tip" advertisements, Lightning's own use of torch's deprecated ``LeafSpec`` (its
    ``utilities/_pytree.py``, on every predict and fit) and PEFT's of transformers' ``is_gradient_checkpointing``.
    The ``persona`` entry point and the bench scripts call it."""
    lightning_log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, DropLightningTips) for f in lightning_log.filters):
        lightning_log.addFilter(DropLightningTips())
    warnings.filterwarnings(
        "ignore",
        message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        category=FutureWarning,
        module=r"lightning\.pytorch\.utilities\._pytree",
    )
    # PEFT asks transformers' deprecated alias on every LoRA wrap (persona never calls it; a grep test pins that).
    warnings.filterwarnings(
        "ignore",
        message=r"`is_gradient_checkpointing` is deprecated",
        category=FutureWarning,
        module=r"transformers\.modeling_utils",
    )


def run_lightning_cli(argv: list[str]) -> None:
    from lightning.pytorch import LightningDataModule, LightningModule
    from lightning.pytorch.cli import LightningCLI

    from persona.core.signals import StopOnSigterm

    class PersonaCLI(LightningCLI):
        def predict(self, **kwargs):
            """LightningCLI runs ``self.predict`` when defined: ``trainer.predict`` keeping no batch outputs unless
            ``--return_predictions true`` (LightningCLI drops what it returns, so collecting is only memory)."""
            return self.trainer.predict(
                **{**kwargs, "return_predictions": bool(kwargs.get("return_predictions"))}
            )

    PersonaCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        trainer_defaults={"callbacks": [StopOnSigterm()]},
        # LightningCLI warns when given the process's own argv; it reads that itself.
        args=None if argv == sys.argv[1:] else argv,
        save_config_kwargs={"overwrite": True},
    )


def flag_hints(function) -> dict[str, object]:
    """Every flag's type: the function's parameters, with each shared flag group's fields in place of the group."""
    from persona.commands.flags import groups_of

    hints = typing.get_type_hints(function)
    for name, group in groups_of(function).items():
        del hints[name]
        hints.update(typing.get_type_hints(group))
    return hints


def bare_bool_flags_as_true(function, argv: list[str]) -> list[str]:
    """Let ``--no_filter`` mean ``--no_filter true``, as in the seed's argparse scripts."""
    hints = flag_hints(function)
    flags = {f"--{name}" for name, hint in hints.items() if hint is bool}
    out = []
    for position, token in enumerate(argv):
        out.append(token)
        following = argv[position + 1] if position + 1 < len(argv) else None
        if token in flags and (following is None or following.startswith("--")):
            out.append("true")
    return out


# Flag names we used before; the seed's own names are the primary ones, so these stay only as aliases.
FLAG_ALIASES = {
    "--output": "--output_path",
    "--out": "--output_path",
    "--out_dir": "--output_dir",
    "--max_new_tokens": "--max_tokens",
    "--force": "--overwrite",
}


def _list_item_type(hint) -> type | None:
    """The element type when ``hint`` admits a list (``list[float]``, ``list[str] | None``, ...), else None."""
    for option in (
        typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    ):
        if typing.get_origin(option) in (list, collections.abc.Sequence):
            return (typing.get_args(option) or (str,))[0]
    return None


def lists_as_lists(function, argv: list[str]) -> list[str]:
    """Every list flag takes ``a,b,c``, ``[a,b,c]`` or ``a b c``: rewritten to one JSON list for jsonargparse."""
    hints = flag_hints(function)
    items = {
        f"--{name}": kind
        for name, hint in hints.items()
        if (kind := _list_item_type(hint)) in (str, int, float)
    }
    out: list[str] = []
    position = 0
    while position < len(argv):
        token = argv[position]
        flag, has_value, inline = token.partition("=")
        position += 1
        if flag not in items:
            out.append(token)
            continue
        values = [inline] if has_value else []
        while not has_value and position < len(argv) and not argv[position].startswith("--"):
            values.append(argv[position])
            position += 1
        parts = [
            part.strip() for value in values for part in value.strip().strip("[]").split(",") if part.strip()
        ]
        if items[flag] is str:
            parts = [part.strip("'\"") for part in parts]
            out += [flag, json.dumps(parts)]
        else:
            out += [flag, "[" + ",".join(parts) + "]"]
    return out


def apply_aliases(function, argv: list[str]) -> list[str]:
    names = {f"--{name}" for name in flag_hints(function)}
    out = []
    for token in argv:
        flag, sep, value = token.partition("=")
        target = FLAG_ALIASES.get(flag)
        out.append(f"{target}{sep}{value}" if target in names and flag not in names else token)
    return out


def attach_negative_values(argv: list[str]) -> list[str]:
    """``--coefs -2,-1,0`` -> ``--coefs=-2,-1,0``: argparse would read a leading minus as another option."""
    out: list[str] = []
    for token in argv:
        if out and out[-1].startswith("--") and "=" not in out[-1] and re.fullmatch(r"-\d[\d.,eE+-]*", token):
            out[-1] = f"{out[-1]}={token}"
        else:
            out.append(token)
    return out


def normalise_argv(function, argv: list[str]) -> list[str]:
    """The seed scripts' spellings as jsonargparse reads them: aliases, bare bool flags, lists, negative values."""
    argv = apply_aliases(function, argv)
    # Lists first: `--coefs -1 0 1` is one list; then a lone negative value (`--coef -2`) is attached to its flag.
    return attach_negative_values(lists_as_lists(function, bare_bool_flags_as_true(function, argv)))


def config_short_flag_parser():
    """jsonargparse's parser with ``-c`` beside ``--config``, as LightningCLI has it for fit and predict."""
    from jsonargparse import ArgumentParser

    class Parser(ArgumentParser):
        def add_argument(self, *names, **kwargs):
            if names == ("--config",):
                names = ("-c", "--config")
            return super().add_argument(*names, **kwargs)

    return Parser


def function_parser(name: str, function):
    """The flags of ``persona <name>``: the function's signature, each shared flag group's fields at top level
    (:mod:`persona.commands.flags`), ``-c/--config`` and ``--print_config``; help from the docstrings."""
    from jsonargparse import ActionConfigFile

    from persona.commands.flags import groups_of

    allow_attribute_docstrings()
    doc = inspect.getdoc(function) or ""
    parser = config_short_flag_parser()(prog=f"persona {name}", description=doc.split("\n\nArgs:")[0])
    parser.add_argument("--config", action=ActionConfigFile, help="Path to a configuration file.")
    groups = groups_of(function)
    parser.add_function_arguments(function, as_positional=False, skip=set(groups))
    for group in groups.values():
        parser.add_class_arguments(group, nested_key=None)
    return parser


def allow_attribute_docstrings() -> None:
    """Help from the docstring under each dataclass field (the flag groups, the study's sections)."""
    import jsonargparse

    if hasattr(jsonargparse, "set_parsing_settings"):  # jsonargparse >= 4.40
        jsonargparse.set_parsing_settings(docstring_parse_attribute_docstrings=True)
    else:
        jsonargparse.set_docstring_parse_options(attribute_docstrings=True)


def run_function(name: str, target: str, argv: list[str]):
    from persona.commands.flags import flat_to_groups

    module_name, _, function_name = target.partition(":")
    function = getattr(importlib.import_module(module_name), function_name)
    argv = normalise_argv(function, argv)
    if argv and not argv[0].startswith("-") and "action" in inspect.signature(function).parameters:
        argv = ["--action", *argv]  # `persona dataset build ...` == `persona dataset --action build ...`
    parser = function_parser(name, function)
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes  # renamed in 4.49
    values = instantiate(parser.parse_args(argv)).as_dict()
    values.pop("config", None)
    return function(**flat_to_groups(function, values))


def main(argv: list[str] | None = None) -> int:
    # Before torch loads: OpenMP threads that spin while idle starve anything else on a small CPU box
    # (other processes, DDP ranks); sleeping threads cost nothing measurable when the box is idle.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    sub = SUBCOMMANDS.get(name)
    if sub is None and name not in LIGHTNING_SUBCOMMANDS:
        print(f"persona: unknown command {name!r}.\n\n{usage()}", file=sys.stderr)
        return 2
    quiet_upstream()
    try:
        check_config_files(rest)
        if name in LIGHTNING_SUBCOMMANDS:
            run_lightning_cli(argv)
        else:
            run_function(name, sub.target, rest)
    except SystemExit as stop:
        from persona.core.errors import SIGTERM_EXIT, stopped_by_sigterm

        if not stopped_by_sigterm(stop):
            raise
        print(f"persona {name}: stopped by SIGTERM (outputs written per batch are kept)", file=sys.stderr)
        return SIGTERM_EXIT
    except Exception as error:
        from persona.core.errors import USER_ERRORS, one_line

        if os.environ.get("PERSONA_DEBUG") or not isinstance(error, USER_ERRORS):
            raise
        print(f"persona {name}: error: {one_line(error)}", file=sys.stderr)
        return getattr(error, "exit_code", 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
