"""Issue 24 on the embedded SmolLM2-135M: the calibration's coherence proxy falls monotonically with the dose
(and the likelihood trait score rises)."""

import pytest

from persona.analysis.calibration import Prober
from persona.data.examples import contrastive_pair_examples
from persona.data.traits import datasets_dir, load_trait
from persona.vectors import load_vector, vectors_to_read
from persona.vectors.dose import layer_norms

DOSES = (0.05, 0.15, 0.4, 1.0)


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_coherence_falls_monotonically_with_the_dose_on_the_embedded_model(smollm2, tmp_path):
    lm, tokenizer = smollm2
    shipped = vectors_to_read("smollm2-135m") / "evil_response_avg_diff.pt"
    path = tmp_path / shipped.name
    path.write_bytes(shipped.read_bytes())  # norms get cached beside the copy, not in the checkout
    norms = layer_norms(path, model="smollm2-135m", lm=lm, tokenizer=tokenizer)
    pairs = contrastive_pair_examples(datasets_dir() / "pairs" / "evil.jsonl", tokenizer, split="test")[:8]
    questions = load_trait("evil", "eval").questions[:4]
    prober = Prober(lm, tokenizer, load_vector(path), norms, questions, pairs, max_tokens=24)
    for layer in (12, 17):
        rows = [prober(layer, dose) for dose in DOSES]
        coherence = [row["coherence"] for row in rows]
        print(f"layer {layer}: coherence at doses {DOSES}: {[round(c, 1) for c in coherence]}")
        assert all(a > b for a, b in zip(coherence, coherence[1:], strict=False)), coherence
        assert coherence[0] > 80 > coherence[-1]
        assert rows[-1]["trait"] > rows[0]["trait"]
