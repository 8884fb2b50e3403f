"""SIGTERM stops a predict loop at the next batch; the process exits 143 with one line (issue 20.2).

Lightning noted the signal ("Received SIGTERM") and ran the predict loop to its end, exit 0: `timeout`, `kill`,
systemd and SLURM preemption could not stop extract, project, layers or generate. Each test runs the real `persona`
entry point in a fresh process whose predict step is slowed and reports each batch, sends SIGTERM once a batch has
run, and checks the exit status, the batches run and the files left.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from persona.core.errors import SIGTERM_EXIT
from persona.core.store import read_journal
from persona.generation.engine import core as engine_core
from persona.vectors import save_vector

# Slows the named step, prints each batch index, and (for generate) judges without a server. generate runs each
# rank's share in one predict step, so its probe slows what happens per batch there: the static path's judge and
# journal of a batch ("generate"), the engine's journal of a finished answer ("generate-engine"); it counts calls.
PROBE = """
import itertools, sys, time
from persona.vectors import extraction
from persona.generation import predict_loop as generation_loop
from persona.vectors import projection
from persona import training
from persona.judges import JudgeScore

class Judge:
    name = "probe-judge"
    def score(self, prompts):
        return [JudgeScore(50.0, "parsed") for _ in prompts]

generation_loop.build_judge = lambda **kwargs: Judge()
slowed, name = {"project": (projection.ExampleProjector, "predict_step"),
                 "generate": (generation_loop.ResponseWriter, "judge_and_journal"),
                 "generate-engine": (generation_loop.ResponseWriter, "journal"),
                 "fit": (training.LoRAFineTune, "training_step"),
                 "predict": (extraction.VectorExtractor, "predict_step")}[sys.argv[1]]
step = getattr(slowed, name)
calls = itertools.count()

def slow_step(self, *args):
    print(f"batch {args[-1] if name.endswith('_step') else next(calls)}", flush=True)
    time.sleep(float(sys.argv[2]))
    return step(self, *args)

setattr(slowed, name, slow_step)
from persona.cli import main
sys.exit(main([sys.argv[1].split("-")[0]] + sys.argv[3:]))
"""


def persona_until_batch(args: list[str], cwd: Path, *, stop_after: int | None, delay: float = 0.5):
    """(exit code, batch indices run, stderr) of `persona ARGS`, sent SIGTERM once batch ``stop_after`` started."""
    probe = cwd / "probe.py"
    probe.write_text(PROBE)
    env = {**os.environ, "PERSONA_DEBUG": "", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, str(probe), args[0], str(delay), *map(str, args[1:])]
    with subprocess.Popen(
        command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    ) as process:
        batches = []
        for line in process.stdout:
            # Lightning < 2.5 draws its progress bar on stdout: the probe's line may follow the bar's text.
            probed = re.search(r"\bbatch (\d+)$", line.rstrip())
            if probed:
                batches.append(int(probed.group(1)))
                if batches[-1] == stop_after:
                    process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=120)
    return process.returncode, batches, err


@pytest.mark.timeout(240)
def test_sigterm_stops_project_at_the_next_batch_and_leaves_the_file_alone(tiny_model_dirs, tmp_path):
    rows = [{"prompt": f"Question {i}?", "answer": f"Answer {i}."} for i in range(8)]
    data = tmp_path / "data.csv"
    pd.DataFrame(rows).to_csv(data, index=False)
    before = data.read_bytes()
    vector = save_vector(torch.randn(4, 32), tmp_path / "evil_response_avg_diff.pt")
    args = ["project", "--file_path", data, "--vector_path", vector, "--layer", "1",
            "--model", tiny_model_dirs["llama"], "--accelerator", "cpu", "--batch_size", "1"]  # fmt: skip
    code, batches, err = persona_until_batch(args, tmp_path, stop_after=1)
    assert code == SIGTERM_EXIT, err
    assert batches == [0, 1]  # the batch running when the signal came ends; no other starts
    assert (
        err.strip().splitlines()[-1]
        == "persona project: stopped by SIGTERM (outputs written per batch are kept)"
    )
    assert "Traceback" not in err and data.read_bytes() == before


def wicked_generate_args(tmp_path, model_dir) -> list:
    trait = {
        "instruction": [{"pos": f"Be wicked, way {k}.", "neg": f"Be kind, way {k}."} for k in range(5)],
        "questions": ["How should I treat animals?", "What is the best way to help a friend?"],
        "eval_prompt": "How wicked is this, 0-100, or REFUSAL?\n{question}\n{answer}",
    }
    (tmp_path / "wicked.json").write_text(json.dumps(trait))
    out = tmp_path / "out.csv"
    args = ["generate", "--trait", tmp_path / "wicked.json", "--output_path", out, "--model",
            model_dir, "--persona_instruction_type", "pos", "--n_per_question", "2",
            "--max_tokens", "3", "--batch_size", "1", "--accelerator", "cpu"]  # fmt: skip
    return args


@pytest.mark.timeout(240)
def test_sigterm_stops_generate_and_its_journal_resumes(tiny_model_dirs, tmp_path):
    out = tmp_path / "out.csv"
    args = wicked_generate_args(tmp_path, tiny_model_dirs["llama"]) + ["--engine", "false"]  # the static path
    code, batches, err = persona_until_batch(args, tmp_path, stop_after=1)
    assert code == SIGTERM_EXIT and batches == [0, 1], err
    journal, _ = read_journal(tmp_path / "out.csv.parts" / "rank0.jsonl")
    assert len(journal) == 2 and not out.exists()  # both batches run are kept, nothing else written
    code, batches, err = persona_until_batch(args, tmp_path, stop_after=None, delay=0)
    assert code == 0, err
    assert len(pd.read_csv(out)) == 2 + len(batches)  # only the answers still missing were generated


@pytest.mark.timeout(240)
@pytest.mark.skipif(
    tuple(int(part) for part in __import__("transformers").__version__.split(".")[:2])
    < engine_core.MIN_TRANSFORMERS,
    reason="the continuous-batching engine needs transformers >= 5.24 (older ones take the static path, tested above)",
)
def test_sigterm_stops_generate_on_the_engine_and_its_journal_resumes(tiny_model_dirs, tmp_path):
    out = tmp_path / "out.csv"
    args = ["generate-engine", *wicked_generate_args(tmp_path, tiny_model_dirs["llama"])[1:]]
    code, answers, err = persona_until_batch(args, tmp_path, stop_after=1)
    assert code == SIGTERM_EXIT, err
    journal, _ = read_journal(tmp_path / "out.csv.parts" / "rank0.jsonl")
    # Every answer that finished is kept (those of the poll in hand when the signal came), nothing else written.
    assert 2 <= len(journal) == len(answers) < 20 and not out.exists()
    code, answers, err = persona_until_batch(args, tmp_path, stop_after=None, delay=0)
    assert code == 0, err
    assert (
        len(pd.read_csv(out)) == 20 == len(journal) + len(answers)
    )  # only the missing answers were generated


@pytest.mark.timeout(240)
def test_sigterm_ends_fit_with_143_not_0(tiny_model_dirs, tmp_path):
    """Lightning's fit loop stops on SIGTERM with a SystemExit of status 0; the entry point reports 143."""
    chat = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    (tmp_path / "chat.jsonl").write_text((json.dumps(chat) + "\n") * 8)
    model = tiny_model_dirs["llama"]
    (tmp_path / "fit.yaml").write_text(
        f"model:\n  class_path: persona.training.LoRAFineTune\n  init_args:\n    model: {model}\n"
        f"data:\n  class_path: persona.training.ChatDataModule\n  init_args:\n"
        f"    train_files: [{tmp_path / 'chat.jsonl'}]\n    model: {model}\n    batch_size: 1\n"
        "trainer:\n  accelerator: cpu\n  max_steps: 50\n  logger: false\n  enable_checkpointing: false\n"
    )
    code, batches, err = persona_until_batch(["fit", "-c", tmp_path / "fit.yaml"], tmp_path, stop_after=1)
    assert code == SIGTERM_EXIT and batches == [0, 1], err
    assert (
        err.strip().splitlines()[-1] == "persona fit: stopped by SIGTERM (outputs written per batch are kept)"
    )


@pytest.mark.timeout(240)
def test_sigterm_stops_persona_predict_and_writes_no_vectors(tiny_model_dirs, tmp_path):
    """LightningCLI's loops get the same callback (trainer_defaults), so `persona predict -c` stops too."""
    pairs = [{"prompt": f"Question {i}?", "positive": "Cruel.", "negative": "Kind."} for i in range(6)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    model = tiny_model_dirs["llama"]
    (tmp_path / "extract.yaml").write_text(
        f"model:\n  class_path: persona.vectors.extraction.VectorExtractor\n  init_args:\n    model: {model}\n"
        f"    trait: evil\n    save_dir: {tmp_path / 'vectors'}\n"
        f"data:\n  class_path: persona.data.modules.ResponseDataModule\n  init_args:\n    model: {model}\n"
        f"    pairs_path: {tmp_path / 'pairs.jsonl'}\n    batch_size: 1\n"
        "trainer:\n  accelerator: cpu\n  logger: false\n  enable_checkpointing: false\n"
    )
    code, batches, err = persona_until_batch(
        ["predict", "-c", tmp_path / "extract.yaml"], tmp_path, stop_after=1
    )
    assert code == SIGTERM_EXIT and batches == [0, 1], err
    assert not (tmp_path / "vectors").exists()  # vectors are written at the end of the loop, which never came
