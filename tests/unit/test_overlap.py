"""The overlap matrix of persona vectors (issue 25): per-layer cosines, CSV + heatmap."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from persona.analysis.overlap import write_overlap
from persona.vectors import save_vector


def test_overlap_csv_holds_every_pairs_cosine_per_layer_and_a_figure(tmp_path):
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(4, 16, generator=generator)
    b = torch.randn(4, 16, generator=generator)
    b[1] = -3 * a[1]  # opposite at layer 1
    c = torch.randn(4, 16, generator=generator)
    c[0] = 0  # no direction at layer 0
    paths = [
        save_vector(v, tmp_path / f"{n}_response_avg_diff.pt")
        for n, v in (("evil", a), ("kind", b), ("fun", c))
    ]
    table = write_overlap(paths, tmp_path / "out")
    written = pd.read_csv(tmp_path / "out" / "overlap.csv")
    assert (tmp_path / "out" / "overlap.png").stat().st_size > 1000
    assert len(written) == 3 * 4 and list(written.columns) == ["layer", "a", "b", "cosine"]
    vectors = {"evil_response_avg_diff": a, "kind_response_avg_diff": b, "fun_response_avg_diff": c}
    for row in written.itertuples():
        x, y = vectors[row.a][row.layer].double(), vectors[row.b][row.layer].double()
        if row.layer == 0 and "fun_response_avg_diff" in (row.a, row.b):
            assert pd.isna(row.cosine)
        else:
            assert row.cosine == pytest.approx(float(x @ y / (x.norm() * y.norm())), abs=1e-6)
    pair = written[(written.a == "evil_response_avg_diff") & (written.b == "kind_response_avg_diff")]
    assert pair.set_index("layer").loc[1, "cosine"] == pytest.approx(-1.0)
    pd.testing.assert_frame_equal(
        table, written, check_exact=False, atol=1e-12
    )  # the returned table is the CSV


def test_overlap_refuses_one_file_and_mixed_shapes(tmp_path):
    one = save_vector(torch.randn(4, 16), tmp_path / "a.pt")
    other = save_vector(torch.randn(5, 16), tmp_path / "b.pt")
    with pytest.raises(ValueError, match="at least 2 vector files"):
        write_overlap([one], tmp_path / "out")
    with pytest.raises(ValueError, match="differ in shape.*Fix"):
        write_overlap([one, other], tmp_path / "out")
