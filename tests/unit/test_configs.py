"""Every shipped YAML parses against the code, so configs never rot."""

from pathlib import Path

import pytest
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
LIGHTNING_CONFIGS = sorted((CONFIGS / "fit").glob("*.yaml")) + sorted((CONFIGS / "predict").glob("*.yaml"))


def test_there_are_configs():
    assert LIGHTNING_CONFIGS


@pytest.mark.parametrize("config", LIGHTNING_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_lightning_config_parses_and_instantiates(config):
    cli = LightningCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=["--config", str(config)],
        run=False,
    )
    assert isinstance(cli.model, LightningModule)
    assert isinstance(cli.datamodule, LightningDataModule)


STUDY_CONFIGS = sorted((CONFIGS / "study").glob("*.yaml"))


@pytest.mark.parametrize("config", STUDY_CONFIGS, ids=lambda p: f"study/{p.name}")
def test_study_config_parses_against_the_command(config):
    from jsonargparse import ArgumentParser

    from persona.study.command import study
    from persona.study.config import StudyTrait

    parser = ArgumentParser()
    parser.add_function_arguments(study)
    parser.add_argument("--config", action="config")
    settings = instantiate(parser)(parser.parse_args(["--config", str(config)]))
    assert settings.traits and all(isinstance(trait, StudyTrait) for trait in settings.traits)


def test_the_seed_study_config_has_its_seven_traits_judge_and_layer():
    from jsonargparse import ArgumentParser

    from persona.study.command import study

    parser = ArgumentParser()
    parser.add_function_arguments(study)
    parser.add_argument("--config", action="config")
    settings = parser.parse_args(["--config", str(CONFIGS / "study" / "qwen2.5-7b-instruct.yaml")])
    names = [trait["name"] for trait in settings.traits]
    assert names == [
        "evil",
        "sycophantic",
        "hallucinating",
        "apathetic",
        "humorous",
        "impolite",
        "optimistic",
    ]
    assert settings.judge.model.startswith("gpt-4.1-mini") and settings.layer == 20


def instantiate(parser):
    """jsonargparse's instantiate (4.49+), or instantiate_classes before it (the compatibility window's oldest end)."""
    return getattr(parser, "instantiate", None) or parser.instantiate_classes


README = CONFIGS.parent / "README.md"


def test_every_class_the_readme_and_configs_name_resolves():
    """Issue 20.8: `persona.training.PreventativeSteering` (the README's short name) got a 65-line usage dump."""
    import re

    from persona.cli import importable

    texts = [README.read_text(), *(path.read_text() for path in CONFIGS.rglob("*.yaml"))]
    named = {m for text in texts for m in re.findall(r"\bpersona(?:\.[a-z_]+)+\.[A-Z]\w+", text)}
    named |= {
        f"persona.training.{name}"
        for name in ("PreventativeSteering", "ConceptAblation", "ProjectionCapping", "ActivationMonitor")
    }
    assert named and sorted(path for path in named if not importable(path)) == []


def test_the_short_callback_names_parse_in_a_fit_config(tmp_path):
    config = CONFIGS / "fit" / "qwen2.5-7b-instruct-steer.yaml"
    short = tmp_path / "steer.yaml"
    short.write_text(config.read_text().replace("persona.training.callbacks.", "persona.training."))
    assert "class_path: persona.training.PreventativeSteering" in short.read_text()
    test_lightning_config_parses_and_instantiates(short)
