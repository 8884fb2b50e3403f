"""On the embedded SmolLM2: vectors from the train split raise the held-out TRAIT likelihood score monotonically.

`persona personality` end to end (extraction of each trait's train split, then the likelihood sweep on
its test split at the middle layer, 15). ~55 s alone on an idle 2-core machine. Measured on all eight
shipped traits (likelihood score, 10 test items, coefs -2 / -1 / 0 / +1 / +2), every one monotone:

    openness           0.414 0.455 0.510 0.569 0.615     neuroticism        0.275 0.311 0.417 0.522 0.576
    conscientiousness  0.433 0.515 0.576 0.621 0.670     machiavellianism   0.317 0.334 0.352 0.369 0.383
    extraversion       0.456 0.515 0.577 0.638 0.690     narcissism         0.312 0.343 0.379 0.419 0.462
    agreeableness      0.438 0.464 0.494 0.529 0.565     psychopathy        0.213 0.244 0.292 0.348 0.394

(sem 0.02-0.05). The one tested here is a Big Five trait with a large, clean rise (the demo sweeps psychopathy).
"""

import pandas as pd
import pytest

from persona.commands.personality import personality

TRAITS = ("extraversion",)
COEFS = (-2.0, 0.0, 2.0)


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_likelihood_score_rises_with_the_coefficient(tmp_path):
    csv_path = personality(
        traits=list(TRAITS),
        model="smollm2-135m",
        coefs=list(COEFS),
        method="likelihood",
        split="test",
        output_dir=str(tmp_path),
        accelerator="cpu",
    )
    frame = pd.read_csv(csv_path)
    assert set(frame["layer"]) == {15}  # the middle of SmolLM2's 30 blocks
    assert (tmp_path / "personality_sweep.png").is_file()
    for trait in TRAITS:
        rows = frame[frame["trait"] == trait].sort_values("coef")
        assert list(rows["coef"]) == list(COEFS) and set(rows["n"]) == {10}
        scores = rows["score"].tolist()
        assert scores[0] < scores[1] < scores[2], f"{trait}: {dict(zip(COEFS, scores, strict=True))}"
