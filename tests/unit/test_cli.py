import pytest

from persona import cli
from persona.cli import SUBCOMMANDS, main


def test_help_lists_every_subcommand(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in (
        "fit",
        "predict",
        "generate",
        "extract",
        "project",
        "steer-eval",
        "layers",
        "screen",
        "shift",
        "export-gguf",
        "report",
        "demo",
        "education",
    ):
        assert f"  {name} " in out


def test_unknown_subcommand_fails(capsys):
    assert cli.main(["no-such-command"]) == 2
    assert "unknown command" in capsys.readouterr().err


def test_built_subcommands_point_at_real_functions():
    import importlib

    for name, sub in cli.SUBCOMMANDS.items():
        if sub.target != "lightning":
            module, _, function = sub.target.partition(":")
            assert callable(getattr(importlib.import_module(module), function)), name


@pytest.mark.parametrize("command", ["fit", "predict"])
def test_lightning_subcommands_show_lightning_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--trainer" in out and "--model" in out and "--config" in out


def test_bare_boolean_flags_mean_true():
    def command(path: str = "", no_filter: bool = False, overwrite: bool = False):
        pass

    assert cli.bare_bool_flags_as_true(command, ["--no_filter", "--path", "x", "--overwrite"]) == [
        "--no_filter",
        "true",
        "--path",
        "x",
        "--overwrite",
        "true",
    ]
    assert cli.bare_bool_flags_as_true(command, ["--no_filter", "false"]) == ["--no_filter", "false"]


def test_leading_word_is_the_action(monkeypatch):
    import types

    seen = {}

    def command(action: str = "list", name: str = ""):
        seen.update(action=action, name=name)

    monkeypatch.setitem(__import__("sys").modules, "fake_module", types.SimpleNamespace(command=command))
    cli.run_function("fake", "fake_module:command", ["build", "--name", "x"])
    assert seen == {"action": "build", "name": "x"}


def test_negative_values_stay_with_their_flag():
    assert cli.attach_negative_values(["--coefs", "-2,-1,0", "--layer", "3", "--coef", "-1.5"]) == [
        "--coefs=-2,-1,0",
        "--layer",
        "3",
        "--coef=-1.5",
    ]


def test_old_flag_names_stay_aliases_where_the_new_name_is_the_flag():
    def command(output_path: str = "", output_dir: str = "", overwrite: bool = False, max_tokens: int = 1):
        pass

    argv = ["--out", "a.gguf", "--out_dir", "d", "--force", "--max_new_tokens=5", "--output", "b"]
    assert cli.apply_aliases(command, argv) == [
        "--output_path", "a.gguf", "--output_dir", "d", "--overwrite", "--max_tokens=5", "--output_path", "b",
    ]  # fmt: skip

    def seed_named(output: str = "", out: str = ""):  # a command whose own flag is the old name keeps it
        pass

    assert cli.apply_aliases(seed_named, ["--out", "x", "--output", "y"]) == ["--out", "x", "--output", "y"]


def test_a_bare_force_means_overwrite_through_the_whole_parser(tmp_path, capsys):
    import torch

    from persona.vectors import save_vector

    vector = save_vector(torch.randn(4, 8), tmp_path / "v.pt")
    out = tmp_path / "v.gguf"
    out.write_bytes(b"old")
    assert cli.main(["export-gguf", "--vector_path", str(vector), "--out", str(out), "--layers", "2,3"]) == 1
    assert "--overwrite" in capsys.readouterr().err and out.read_bytes() == b"old"
    assert (
        cli.main(["export-gguf", "--vector_path", str(vector), "--out", str(out), "--layers", "2", "--force"])
        == 0
    )
    assert out.read_bytes() != b"old"


def test_a_list_of_negative_values_separated_by_spaces_is_one_list():
    def command(coefs: list[float] = (), coef: float = 0.0, no_filter: bool = False, output_path: str = ""):
        pass

    assert cli.normalise_argv(command, ["--coefs", "-1", "0", "1", "--coef", "-2", "--no_filter"]) == [
        "--coefs", "[-1,0,1]", "--coef=-2", "--no_filter", "true",
    ]  # fmt: skip
    assert cli.normalise_argv(command, ["--coefs", "-2,-1,0", "--out", "x.csv"]) == [
        "--coefs", "[-2,-1,0]", "--output_path", "x.csv",
    ]  # fmt: skip


@pytest.mark.parametrize("command", [name for name, sub in SUBCOMMANDS.items() if sub.target != "lightning"])
def test_every_command_reads_back_its_printed_config_with_short_c(command, tmp_path, capsys):
    """``-c`` wherever ``--config`` is read (as LightningCLI has it): a printed config reads back unchanged."""
    with pytest.raises(SystemExit) as stop:
        main([command, "--print_config"])
    assert stop.value.code in (0, None)
    printed = capsys.readouterr().out
    config = tmp_path / "config.yaml"
    config.write_text(printed, encoding="utf-8")
    with pytest.raises(SystemExit) as stop:
        main([command, "-c", str(config), "--print_config"])
    assert stop.value.code in (0, None), capsys.readouterr().err
    assert capsys.readouterr().out == printed


def test_lightning_predict_keeps_no_batch_outputs(tiny_model_dirs, tmp_path, monkeypatch):
    """`persona predict` runs trainer.predict with return_predictions=False unless asked: VectorExtractor's
    predict_step returns each batch's sums, which LightningCLI would otherwise hold for nothing."""
    import functools
    import json

    import lightning.pytorch as pl

    pairs = tmp_path / "pairs.jsonl"
    row = {"prompt": "Hi?", "positive": "Go away.", "negative": "Hello!", "split": "train"}
    pairs.write_text("".join(json.dumps(row) + "\n" for _ in range(3)))
    seen = []
    real_predict = pl.Trainer.predict

    @functools.wraps(real_predict)  # LightningCLI reads the predict flags from this signature
    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("return_predictions"))
        return real_predict(self, *args, **kwargs)

    monkeypatch.setattr(pl.Trainer, "predict", spy)
    model = tiny_model_dirs["llama"]
    args = [
        "predict",
        "--model=persona.vectors.extraction.VectorExtractor",
        f"--model.model={model}",
        f"--model.save_dir={tmp_path / 'vectors'}",
        "--data=persona.data.modules.ResponseDataModule",
        f"--data.model={model}",
        f"--data.pairs_path={pairs}",
        "--trainer.accelerator=cpu",
        "--trainer.logger=false",
        f"--trainer.default_root_dir={tmp_path}",
    ]
    assert cli.main(args) == 0
    assert cli.main([args[0], "--return_predictions=true", *args[1:], "--model.trait=again"]) == 0
    assert seen == [False, True]
    assert (tmp_path / "vectors" / "trait_response_avg_diff.pt").is_file()
