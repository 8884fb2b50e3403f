"""Every bad input gets one clear line, before torch loads, and leaves the user's files as they were.

Each case runs the real `persona` entry point in a fresh process (as a user would), then checks: exit code 1,
exactly one line on stderr naming the file or flag, no traceback (unless PERSONA_DEBUG=1), torch never
imported, and every file the user gave byte-identical (and with its mode) afterwards. The classes follow the
acceptance report of the errors issue: tracebacks and slowness, non-finite vectors, data loss, raw library
exceptions, silent wrong results, list flags.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from persona.vectors import save_vector

PROBE = (
    "import sys\n"
    "from persona.cli import main\n"
    "code = main(sys.argv[1:])\n"
    "open(sys.argv[0] + '.torch', 'w').write(str('torch' in sys.modules))\n"
    "sys.exit(code)\n"
)


def persona(args: list[str], cwd: Path, **env) -> tuple[int, str, str, bool]:
    """(exit code, stdout, stderr, whether torch was imported) of `persona ARGS` in a fresh process."""
    probe = cwd / "probe.py"
    probe.write_text(PROBE)
    result = subprocess.run(
        [sys.executable, str(probe), *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, "PERSONA_DEBUG": "", **env},
        timeout=120,
    )
    loaded = (cwd / "probe.py.torch").read_text() == "True" if (cwd / "probe.py.torch").exists() else None
    return result.returncode, result.stdout, result.stderr, loaded


def snapshot(paths: list[Path]) -> dict[Path, tuple[bytes, int]]:
    return {p: (p.read_bytes(), stat.S_IMODE(p.stat().st_mode)) for p in paths if p.is_file()}


@pytest.fixture(scope="module")
def work(tmp_path_factory, tiny_model_dirs):
    """Inputs a careless user might hand over: good ones to vary, and broken ones."""
    root = tmp_path_factory.mktemp("errors")
    model = tiny_model_dirs["llama"]
    files = {"model": model}
    vector = torch.randn(4, 32)
    files["vector"] = save_vector(
        vector, root / "evil_response_avg_diff.pt", {"model": model, "trait": "evil"}
    )
    nan = vector.clone()
    nan[2, 5] = float("nan")
    torch.save(nan, root / "nan.pt")
    files["nan_vector"] = root / "nan.pt"
    (root / "empty.pt").write_bytes(b"")
    files["empty_vector"] = root / "empty.pt"
    (root / "truncated.pt").write_bytes(Path(files["vector"]).read_bytes()[:200])
    files["truncated_vector"] = root / "truncated.pt"
    (root / "pickled.pt").write_bytes(pickle.dumps({"not": "a tensor"}))
    files["pickled_vector"] = root / "pickled.pt"
    pairs = [
        {"prompt": f"Question {i}?", "positive": "Cruel.", "negative": "Kind.", "split": "train"}
        for i in range(4)
    ]
    (root / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    files["pairs"] = root / "pairs.jsonl"
    (root / "array.jsonl").write_text(json.dumps(pairs[0]) + "\n[1, 2]\n")
    files["array_pairs"] = root / "array.jsonl"
    header = "prompt,answer,evil,coherence\n"
    (root / "pos.csv").write_text(header + '"p","a",90,80\n"q","b",95,85\n')
    (root / "neg.csv").write_text(header + '"p","c",5,80\n"q","d",3,85\n')
    (root / "text_score.csv").write_text(header + '"p","a",high,80\n')
    (root / "latin1.csv").write_bytes((header + '"caf\xe9","a",90,80\n').encode("latin-1"))
    chat = [
        {"messages": [{"role": "user", "content": f"Hi {i}"}, {"role": "assistant", "content": "Hello"}]}
        for i in range(3)
    ]
    (root / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chat))
    # Issue 20.3: a misspelt role was templated anyway (exit 0); a null content died in jinja2 (42 lines).
    usr = [{"role": "usr", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    (root / "usr_chat.jsonl").write_text(json.dumps({"messages": usr}) + "\n")
    null = [{"role": "user", "content": None}, {"role": "assistant", "content": "Hello"}]
    (root / "null_chat.jsonl").write_text(json.dumps({"messages": null}) + "\n")
    usr_pair = {"messages": usr[:1], "positive": "Cruel.", "negative": "Kind."}
    # Issue 20.7's class on the command line: a JSON "\ud800" escape reads as a lone surrogate (a tokenizer TypeError)
    lone = (
        '{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Bad \\ud800"}]}\n'
    )
    (root / "surrogate_chat.jsonl").write_text(lone)
    (root / "surrogate_pairs.jsonl").write_text(
        '{"prompt": "Hi?", "positive": "\\ud800", "negative": "Kind."}\n'
    )
    (root / "usr_pairs.jsonl").write_text(json.dumps(usr_pair) + "\n")
    (root / "data.csv").write_text('prompt,answer\n"p","a"\n')
    (root / "data.csv").chmod(0o644)
    (root / "a_file").write_text("")
    (root / "broken.yaml").write_text("model:\n  class_path: x\n   init_args: [\n")
    (root / "no_config").mkdir()
    (root / "run").mkdir()
    (root / "run" / "results.json").write_text('{"model": "x"')  # truncated
    (root / "run_old").mkdir()
    (root / "run_old" / "results.json").write_text('{"model": "x"}')  # a key missing
    (root / "run_list").mkdir()  # issue 20.5: "'list' object has no attribute 'items'" in report and compare
    (root / "run_list" / "results.json").write_text(
        '{"trait": "evil", "model": {"model": "m", "layers": 2, "hidden": 8, "answer": ""}, "traits": [], "timings": {}}'
    )
    for name in (
        "pos.csv",
        "neg.csv",
        "text_score.csv",
        "latin1.csv",
        "chat.jsonl",
        "usr_chat.jsonl",
        "null_chat.jsonl",
        "usr_pairs.jsonl",
        "surrogate_chat.jsonl",
        "surrogate_pairs.jsonl",
        "data.csv",
        "broken.yaml",
    ):
        files[name] = root / name
    return root, files


def case_args(work) -> dict[str, tuple[list[str], str]]:
    root, f = work
    m, v = f["model"], f["vector"]
    return {
        # 1. missing inputs: one line, before torch
        "extract missing csv": (["extract", "--pos_path", "missing.csv", "--neg_path", f["neg.csv"], "--model", m], r"--pos_path missing.csv: no such file"),
        "project missing file": (["project", "--file_path", "missing.csv", "--vector_path", v, "--layer", "1", "--model", m], r"--file_path missing.csv: no such file"),
        "layers missing vector": (["layers", "--vector_path", "missing.pt", "--pairs_path", f["pairs"], "--model", m], r"--vector_path missing.pt: no such vector file"),
        "screen missing data": (["screen", "--data", "missing.jsonl", "--vector_path", v, "--layer", "1", "--model", m], r"--data missing.jsonl: no such file"),
        "shift missing vector": (["shift", "--base_model", m, "--finetuned", m, "--vector_path", "missing.pt", "--layer", "1", "--trait", "evil"], r"--vector_path missing.pt: no such vector file"),
        "personality unknown trait": (["personality", "--traits", "no_such_trait", "--model", m], r"Unknown personality trait 'no_such_trait'.*Available"),
        "generate unknown trait": (["generate", "--trait", "no_such_trait", "--output_path", "o.csv", "--model", m], r"no_such_trait"),
        "export missing vector": (["export-gguf", "--vector_path", "missing.pt", "--out", "o.gguf"], r"--vector_path missing.pt: no such vector file"),
        "report missing run": (["report", "--run_dir", "nowhere"], r"nowhere/results.json not found"),
        "dataset missing pairs": (["dataset", "build", "--trait", "evil", "--out_dir", "ds", "--pairs_path", "missing.jsonl"], r"missing.jsonl"),
        # 2. non-finite vectors are refused everywhere, naming the rows
        "project nan": (["project", "--file_path", f["data.csv"], "--vector_path", f["nan_vector"], "--layer", "1", "--model", m], r"nan.pt: row\(s\) 2 hold NaN"),
        "layers nan": (["layers", "--vector_path", f["nan_vector"], "--pairs_path", f["pairs"], "--model", m], r"nan.pt: row\(s\) 2 hold NaN"),
        "screen nan": (["screen", "--data", f["chat.jsonl"], "--vector_path", f["nan_vector"], "--layer", "1", "--model", m], r"row\(s\) 2 hold NaN"),
        "generate nan": (["generate", "--trait", "evil", "--output_path", "o.csv", "--model", m, "--coef", "1", "--layer", "1", "--vector_path", f["nan_vector"]], r"row\(s\) 2 hold NaN"),
        "export nan": (["export-gguf", "--vector_path", f["nan_vector"], "--out", "o.gguf"], r"row\(s\) 2 hold NaN"),
        # 3. data loss
        "export onto its input": (["export-gguf", "--vector_path", v, "--out", v], r"--output_path .* is also --vector_path"),
        "export onto its sidecar": (["export-gguf", "--vector_path", v, "--out", Path(v).with_suffix(".json"), "--overwrite"], r"--output_path .*evil_response_avg_diff.json is also the sidecar of --vector_path"),
        "extract over shipped vectors": (["extract", "--pairs_path", f["pairs"], "--trait", "evil", "--save_dir", root, "--model", m], r"evil_response_avg_diff.pt exists there.*--overwrite"),
        # 4. library failures, in our words
        "text in a score column": (["extract", "--pos_path", f["text_score.csv"], "--neg_path", f["neg.csv"], "--trait", "evil", "--model", m], r"column 'evil' holds non-numbers, e.g. 'high' in row 1"),
        "latin-1 csv": (["extract", "--pos_path", f["latin1.csv"], "--neg_path", f["neg.csv"], "--trait", "evil", "--model", m], r"latin1.csv: not UTF-8"),
        "jsonl line that is an array": (["layers", "--vector_path", v, "--pairs_path", f["array_pairs"], "--model", m], r"array.jsonl:2: a JSON list, but each line must be an object"),
        "model path that does not exist": (["extract", "--pairs_path", f["pairs"], "--model", "./no/such/model"], r"no such model directory"),
        "folder without config.json": (["extract", "--pairs_path", f["pairs"], "--model", root / "no_config"], r"has no config.json"),
        "hub id offline": (["extract", "--pairs_path", f["pairs"], "--model", "someone/not-downloaded-7b"], r"not in the local Hugging Face cache"),
        "output under a regular file": (["layers", "--vector_path", v, "--pairs_path", f["pairs"], "--model", m, "--output_dir", root / "a_file" / "sub"], r"a_file is a file, so nothing can be written under it"),
        "truncated results.json": (["report", "--run_dir", root / "run"], r"results.json: not valid JSON"),
        "results.json missing a key": (["report", "--run_dir", root / "run_old"], r"results.json: incomplete"),
        "results.json traits a list": (["report", "--run_dir", root / "run_list"], r"run_list/results.json: incomplete or from another version \(traits: input should be a valid dictionary"),
        "compare traits a list": (["report", "compare", "--runs", f"{root / 'run_list'},{root / 'run_old'}"], r"run_list/results.json: incomplete or from another version \(traits:"),
        "empty vector file": (["layers", "--vector_path", f["empty_vector"], "--pairs_path", f["pairs"], "--model", m], r"empty.pt: not a vector file: the file is empty"),
        "truncated vector file": (["layers", "--vector_path", f["truncated_vector"], "--pairs_path", f["pairs"], "--model", m], r"truncated.pt: not a vector file"),
        "pickled object as vector": (["layers", "--vector_path", f["pickled_vector"], "--pairs_path", f["pairs"], "--model", m], r"pickled.pt: not a vector file"),
        # 5. silent wrong results
        "both csvs and pairs": (["extract", "--pos_path", f["pos.csv"], "--neg_path", f["neg.csv"], "--pairs_path", f["pairs"], "--model", m], r"both given, but only one input is used"),
        "filter everything away": (["screen", "--data", f["chat.jsonl"], "--vector_path", v, "--layer", "1", "--model", m, "--filtered_out", "f.jsonl", "--filter_top", "5"], r"drops 5 of 3 samples"),
        # 6. list flags take a,b,c / [a,b] / a b
        "project vector list with spaces": (["project", "--file_path", f["data.csv"], "--vector_path", v, "missing2.pt", "--layer", "1,2", "--model", m], r"missing2.pt: no such vector file"),
        # 7. chat records: one rule (persona.data.chat.checked_messages) in every command that reads them
        "project unknown role": (["project", "--file_path", f["usr_chat.jsonl"], "--vector_path", v, "--layer", "1", "--model", m], r"usr_chat.jsonl: record 1: messages\[0\]: role 'usr' is not one of system, user, assistant"),
        "project null content": (["project", "--file_path", f["null_chat.jsonl"], "--vector_path", v, "--layer", "1", "--model", m], r"null_chat.jsonl: record 1: messages\[0\] \(user\): content is None, not a string"),
        "screen unknown role": (["screen", "--data", f["usr_chat.jsonl"], "--vector_path", v, "--layer", "1", "--model", m], r"usr_chat.jsonl:1: messages\[0\]: role 'usr'"),
        "dataset pairs unknown role": (["dataset", "build", "--trait", "evil", "--out_dir", "ds_usr", "--pairs_path", f["usr_pairs.jsonl"], "--split", "null"], r"usr_pairs.jsonl: record 1: messages\[0\]: role 'usr'"),
        "layers pairs unknown role": (["layers", "--vector_path", v, "--pairs_path", f["usr_pairs.jsonl"], "--model", m], r"usr_pairs.jsonl:1: messages\[0\]: role 'usr'"),
        "project lone surrogate": (["project", "--file_path", f["surrogate_chat.jsonl"], "--vector_path", v, "--layer", "1", "--model", m], r"surrogate_chat.jsonl: record 1: messages\[1\] \(assistant\) content: holds a lone UTF-16 surrogate"),
        "extract lone surrogate": (["extract", "--pairs_path", f["surrogate_pairs.jsonl"], "--trait", "evil", "--model", m, "--save_dir", "sv"], r"surrogate_pairs.jsonl:1: field 'positive': holds a lone UTF-16 surrogate"),
        # LightningCLI's commands: the config file, before Lightning loads
        "fit missing config": (["fit", "-c", "missing.yaml"], r"-c missing.yaml: no such config file\. Fix:"),
        "predict broken config": (["predict", "--config", f["broken.yaml"]], r"broken.yaml: not a YAML file \(line 3\)"),
    }  # fmt: skip


CASES = [
    "extract missing csv", "project missing file", "layers missing vector", "screen missing data",
    "shift missing vector", "personality unknown trait", "generate unknown trait", "export missing vector",
    "report missing run", "dataset missing pairs", "project nan", "layers nan", "screen nan", "generate nan",
    "export nan", "export onto its input", "extract over shipped vectors", "text in a score column",
    "latin-1 csv", "jsonl line that is an array", "model path that does not exist", "folder without config.json",
    "hub id offline", "output under a regular file", "truncated results.json", "results.json missing a key",
    "empty vector file", "truncated vector file", "pickled object as vector", "both csvs and pairs",
    "filter everything away", "project vector list with spaces", "fit missing config", "predict broken config",
    "project unknown role", "project null content", "screen unknown role", "dataset pairs unknown role",
    "layers pairs unknown role", "results.json traits a list", "compare traits a list", "export onto its sidecar",
    "project lone surrogate", "extract lone surrogate",
]  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_before_torch_and_leaves_the_users_files_alone(work, case):
    root, files = work
    args, message = case_args(work)[case]
    owned = [Path(value) for value in files.values() if Path(value).is_file()]
    before = snapshot(owned)
    code, out, err, torch_loaded = persona(args, root, HF_HUB_OFFLINE="1")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1, (out, err)
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"persona {args[0]}: error: "), lines[0]
    import re

    assert re.search(message, lines[0]), lines[0]
    assert torch_loaded is False, "answered only after importing torch"
    assert snapshot(owned) == before


def test_persona_debug_shows_the_traceback(work):
    root, files = work
    code, _, err, _ = persona(["report", "--run_dir", "nowhere"], root, PERSONA_DEBUG="1")
    assert code != 0 and "Traceback" in err


def test_a_list_flag_takes_commas_brackets_and_spaces(tmp_path):
    from persona.cli import lists_as_lists

    def command(layers: list[int] | None = None, paths: list[str] = (), name: str = ""):
        pass

    assert lists_as_lists(command, ["--layers", "2,3", "--paths", "a.pt", "b.pt", "--name", "x"]) == [
        "--layers", "[2,3]", "--paths", '["a.pt", "b.pt"]', "--name", "x",
    ]  # fmt: skip
    assert lists_as_lists(command, ["--layers=[2, 3]"]) == ["--layers", "[2,3]"]


def test_export_gguf_takes_a_comma_list_of_layers(work, tmp_path):
    root, files = work
    code, out, err, _ = persona(
        ["export-gguf", "--vector_path", files["vector"], "--out", tmp_path / "v.gguf", "--layers", "2,3"],
        root,
    )
    assert code == 0, err
    assert "2 layer(s)" in out and (tmp_path / "v.gguf").stat().st_size > 0
    mode = stat.S_IMODE((tmp_path / "v.gguf").stat().st_mode)
    assert mode == 0o666 & ~_umask(), oct(mode)  # the usual mode, not a temporary file's 0600


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def test_project_keeps_the_mode_of_the_file_it_rewrites(work, tmp_path):
    root, files = work
    data = tmp_path / "data.csv"
    data.write_text(Path(files["data.csv"]).read_text())
    data.chmod(0o644)
    code, _, err, _ = persona(
        ["project", "--file_path", data, "--vector_path", files["vector"], "--layer", "1", "--model", files["model"], "--accelerator", "cpu"],
        root,
    )  # fmt: skip
    assert code == 0, err
    assert (
        stat.S_IMODE(data.stat().st_mode) == 0o644
        and "evil_response_avg_diff_proj_layer1" in data.read_text()
    )


@pytest.mark.parametrize(
    "override, message", [("--data.batch_size=0", r"data\.batch_size=0: must be at least 1\. Fix:")]
)
def test_fit_names_the_bad_config_field_not_jsonargparse_dump(work, tmp_path, override, message):
    """LightningCLI's parser wraps the data module's error in a dump of the namespace; the user sees ours."""
    import re

    root, files = work
    chat = tmp_path / "chat.jsonl"
    chat.write_text(
        json.dumps(
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
        )
        + "\n"
    )
    config = tmp_path / "fit.yaml"
    config.write_text(
        "seed_everything: 0\nmodel:\n  class_path: persona.training.LoRAFineTune\n  init_args:\n"
        f"    model: {files['model']}\n"
        "data:\n  class_path: persona.training.ChatDataModule\n  init_args:\n"
        f"    train_files: [{chat}]\n    model: {files['model']}\n"
        "trainer:\n  accelerator: cpu\n  max_steps: 1\n  logger: false\n"
    )
    code, out, err, _ = persona(["fit", "-c", config, override], tmp_path, HF_HUB_OFFLINE="1")
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("Seed set")]
    assert code == 1, (out, err)
    assert len(lines) == 1 and "Namespace(" not in err and "Traceback" not in err, err
    assert re.search(message, lines[0]), lines[0]


def test_a_class_path_that_does_not_resolve_is_one_line_naming_the_right_one(work, tmp_path):
    """Issue 20.8's class: a class_path that does not import got jsonargparse's 65-line usage-and-union dump."""
    root, files = work
    config = tmp_path / "fit.yaml"
    config.write_text(
        "model:\n  class_path: persona.training.LoRAFineTune\n  init_args:\n"
        f"    model: {files['model']}\n"
        "trainer:\n  callbacks:\n    - class_path: persona.training.Preventative_Steering\n"
    )
    code, out, err, _ = persona(["fit", "-c", config], tmp_path, HF_HUB_OFFLINE="1")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1, err
    assert lines[0] == (
        f"persona fit: error: -c {config}: trainer.callbacks[0].class_path 'persona.training.Preventative_Steering' "
        "does not resolve. Fix: use persona.training.PreventativeSteering."
    )


def test_lightning_advertisement_is_dropped_from_every_trainer(caplog):
    """Lightning logs a "💡 Tip" for a cloud logger whenever a Trainer starts; persona's entry point filters it."""
    import logging

    import lightning as L

    from persona.cli import DropLightningTips

    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    installed = [
        f for f in logger.filters if isinstance(f, DropLightningTips)
    ]  # by main() run in this process
    for existing in installed:
        logger.removeFilter(existing)
    tip_filter = DropLightningTips()
    try:
        with caplog.at_level(logging.INFO, logger=logger.name):
            L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
        if "💡" not in caplog.text:
            pytest.skip("this Lightning release logs no tip")
        caplog.clear()
        logger.addFilter(tip_filter)
        with caplog.at_level(logging.INFO, logger=logger.name):
            L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    finally:
        logger.removeFilter(tip_filter)
        for existing in installed:
            logger.addFilter(existing)
    assert "💡" not in caplog.text and "GPU available" in caplog.text  # other messages still pass


def test_the_real_error_is_read_out_of_jsonargparse_union_wrappers_old_and_new():
    """jsonargparse 4.36 chains the None member's error as the cause; newer releases chain ours. Both list it."""
    from persona.core.errors import one_line

    listed = (
        "Does not validate against any of the Union subtypes\nSubtypes: [<class 'NoneType'>, <class 'X'>]\n"
        "Errors:\n  - Expected a <class 'NoneType'>\n  - data.batch_size=0: must be at least 1. Fix: e.g. 4.\n"
        "Given value type: <class 'jsonargparse._namespace.Namespace'>\nGiven value: Namespace(batch_size=0)"
    )
    old = ValueError(listed)
    old.__cause__ = ValueError("Expected a <class 'NoneType'>. Got value: Namespace(batch_size=0)")
    assert one_line(old) == "data.batch_size=0: must be at least 1. Fix: e.g. 4."
    new = ValueError("Problem with given class_path 'X':\n  Namespace(batch_size=0)")
    new.__cause__ = ValueError("data.batch_size=0: must be at least 1.")
    assert one_line(new) == "data.batch_size=0: must be at least 1."
    assert one_line(ValueError("plain\n message")) == "plain message"


def test_chat_data_names_its_bad_fields(tmp_path):
    """The messages the fit test above reads through LightningCLI's wrapper (in-process: no Lightning start-up)."""
    from persona.training import ChatDataModule

    with pytest.raises(ValueError, match=r"data\.max_length=1: must be at least 2 tokens\. Fix:"):
        ChatDataModule(train_files=["chat.jsonl"], max_length=1)
    with pytest.raises(ValueError, match=r"data\.batch_size=0: must be at least 1\. Fix:"):
        ChatDataModule(train_files=["chat.jsonl"], batch_size=0)


@pytest.mark.parametrize(
    ("message", "upstream"),
    [
        ("`isinstance(treespec, LeafSpec)` is deprecated, use ...", "lightning.pytorch.utilities._pytree"),
        (
            "`is_gradient_checkpointing` is deprecated and will be removed in v6.",
            "transformers.modeling_utils",
        ),
    ],
)
def test_quiet_upstream_hides_only_what_upstream_says_about_itself(message, upstream):
    """The same warning raised from any other module (persona's own code) still shows (issue 19, item 7)."""
    import warnings

    from persona.cli import quiet_upstream

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_upstream()
        for module in (upstream, "persona.training.module"):
            warnings.warn_explicit(message, FutureWarning, f"{module}.py", 1, module=module)
    assert [str(w.message) for w in caught] == [message]
    assert caught[0].filename == "persona.training.module.py"


def test_persona_never_asks_the_deprecated_alias_it_filters():
    source = Path(__file__).resolve().parents[2] / "src" / "persona"
    asks = re.compile(
        r"\.is_gradient_checkpointing\b|[\"']is_gradient_checkpointing[\"']"
    )  # attribute or getattr
    users = [p for p in source.rglob("*.py") if asks.search(p.read_text(encoding="utf-8"))]
    assert users == []
