"""A plain `persona extract` on the embedded model prints what a user needs and no warning (issue 19, item 7).

Pins three lines every run used to print: Lightning's "You have overridden `transfer_batch_to_device` in
`LightningModule` but have passed in a `LightningDataModule`" (the hook now lives on the DataModule), "predict
returned None" (predict_step now returns the batch's sums) and Lightning's own `_pytree` deprecation (filtered,
with its "💡 Tip" advertisement, by ``persona.cli.quiet_upstream``).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import persona

PAIRS = Path(__file__).resolve().parents[2] / "datasets" / "pairs" / "evil.jsonl"
WARNING_LINE = re.compile(r"warn|deprecat|\.py:\d+: |💡", re.IGNORECASE)


@pytest.mark.timeout(300)
def test_plain_extract_prints_no_warning_line(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    source = str(Path(persona.__file__).resolve().parents[1])  # this checkout's persona, not an installed one
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [source, env.get("PYTHONPATH")]))
    env.pop("PYTHONWARNINGS", None)  # Python's default filters, as a user's shell has them
    command = [sys.executable, "-m", "persona.cli", "extract", "--pairs_path", str(PAIRS), "--trait", "evil"]
    run = subprocess.run(
        [*command, "--save_dir", str(tmp_path)], env=env, cwd=tmp_path, capture_output=True, text=True
    )
    output = run.stdout + run.stderr
    assert run.returncode == 0, output
    assert (tmp_path / "evil_response_avg_diff.pt").is_file()
    warnings = [line for line in output.splitlines() if WARNING_LINE.search(line)]
    assert warnings == [], output
