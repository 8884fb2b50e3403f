import pytest

from persona import cli


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
