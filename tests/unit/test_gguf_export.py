import gguf
import numpy as np
import pytest
import torch

from persona import cli
from persona.vectors import save_vector
from persona.vectors.gguf import export_gguf, import_gguf

NUM_LAYERS, HIDDEN = 4, 8


@pytest.fixture
def vector_file(tmp_path):
    vector = torch.randn(NUM_LAYERS + 1, HIDDEN, generator=torch.Generator().manual_seed(0))
    path = save_vector(vector, tmp_path / "evil_response_avg_diff.pt", {"model": "smollm2-135m"})
    return path, vector


def read(path):
    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    return reader, tensors


def test_round_trip_is_exact_for_exported_rows_and_zero_elsewhere(vector_file, tmp_path):
    path, vector = vector_file
    out = export_gguf(str(path), str(tmp_path / "v.gguf"))
    back = import_gguf(out, num_layers=NUM_LAYERS)
    assert back.shape == (NUM_LAYERS + 1, HIDDEN) and back.dtype == torch.float32
    assert torch.equal(back[2:], vector[2:])
    assert torch.equal(back[:2], torch.zeros(2, HIDDEN))


def test_subset_round_trip_and_default_num_layers(vector_file, tmp_path):
    path, vector = vector_file
    out = export_gguf(str(path), str(tmp_path / "v.gguf"), layers=[3, 2])
    back = import_gguf(out)  # highest direction is 2 -> 3 blocks
    assert back.shape == (4, HIDDEN)
    assert torch.equal(back[2:4], vector[2:4])
    assert not back[:2].any()


def test_keys_names_dtypes_and_shapes(vector_file, tmp_path):
    path, vector = vector_file
    out = export_gguf(str(path), str(tmp_path / "v.gguf"), layers=[2, 4])
    reader, tensors = read(out)
    assert reader.get_field("general.architecture").contents() == "controlvector"
    assert reader.get_field("controlvector.model_hint").contents() == "smollm2-135m"
    count = reader.get_field("controlvector.layer_count")
    assert count.types == [gguf.GGUFValueType.UINT32] and count.contents() == 2
    # Row L is the output of block L-1, which llama.cpp steers with direction.{L-1}.
    assert set(tensors) == {"direction.1", "direction.3"}
    for name, row in (("direction.1", 2), ("direction.3", 4)):
        tensor = tensors[name]
        assert tensor.tensor_type == gguf.GGMLQuantizationType.F32
        assert list(tensor.shape) == [HIDDEN]
        assert np.array_equal(np.asarray(tensor.data), vector[row].numpy())


def test_model_hint_falls_back_to_stem_and_can_be_given(tmp_path):
    path = tmp_path / "kind_prompt_avg_diff.pt"
    torch.save(torch.ones(NUM_LAYERS + 1, HIDDEN), path)  # no sidecar
    reader, _ = read(export_gguf(str(path), str(tmp_path / "a.gguf")))
    assert reader.get_field("controlvector.model_hint").contents() == "kind_prompt_avg_diff"
    reader, _ = read(export_gguf(str(path), str(tmp_path / "b.gguf"), model_hint="llama"))
    assert reader.get_field("controlvector.model_hint").contents() == "llama"


def test_coef_scales(vector_file, tmp_path):
    path, vector = vector_file
    back = import_gguf(export_gguf(str(path), str(tmp_path / "v.gguf"), coef=-2.5), num_layers=NUM_LAYERS)
    assert torch.equal(back[2:], vector[2:] * -2.5)


def test_a_dose_scales_each_row_to_its_own_residual_norm(tmp_path):
    """Issue 24: --dose in export-gguf: row L gets dose * mean||h_L|| / ||v_L||, the same push relative to each
    layer's own residual norm; one of --coef/--dose; the guard refuses a dose past the limit."""
    from persona.core.errors import PersonaError

    vector = torch.randn(NUM_LAYERS + 1, HIDDEN, generator=torch.Generator().manual_seed(1))
    norms = [10.0, 20.0, 40.0, 80.0, 160.0]
    path = save_vector(vector, tmp_path / "v.pt", {"model": "m", "mean_residual_norms": norms})
    back = import_gguf(export_gguf(str(path), str(tmp_path / "d.gguf"), dose=0.5), num_layers=NUM_LAYERS)
    for row in range(2, NUM_LAYERS + 1):
        expected = vector[row].double() * (0.5 * norms[row] / vector[row].double().norm())
        torch.testing.assert_close(back[row].double(), expected, rtol=1e-6, atol=1e-6)
        assert float(back[row].norm()) == pytest.approx(0.5 * norms[row], rel=1e-5)
    with pytest.raises(PersonaError, match="--coef and --dose were both given"):
        export_gguf(str(path), str(tmp_path / "x.gguf"), coef=1.0, dose=0.5)
    with pytest.raises(PersonaError, match="--dose=3 exceeds the dose limit"):
        export_gguf(str(path), str(tmp_path / "y.gguf"), dose=3.0)
    export_gguf(str(path), str(tmp_path / "z.gguf"), dose=3.0, allow_high_dose=True)


@pytest.mark.parametrize("row", [0, 1])
def test_rows_llama_cpp_cannot_steer_are_refused(vector_file, tmp_path, row):
    path, _ = vector_file
    with pytest.raises(ValueError, match="cannot be written as a llama.cpp control vector"):
        export_gguf(str(path), str(tmp_path / "v.gguf"), layers=[row, 2])
    assert not (tmp_path / "v.gguf").exists()


@pytest.mark.parametrize("row", [NUM_LAYERS + 1, -1])
def test_out_of_range_row_is_refused(vector_file, tmp_path, row):
    path, _ = vector_file
    with pytest.raises(ValueError, match="out of range"):
        export_gguf(str(path), str(tmp_path / "v.gguf"), layers=[row])


def test_non_controlvector_gguf_is_refused(tmp_path):
    path = tmp_path / "model.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tensor("token_embd.weight", np.zeros((4, HIDDEN), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=r"model\.gguf.*not a control vector"):
        import_gguf(str(path))


def test_not_a_gguf_file_is_refused(tmp_path):
    path = tmp_path / "junk.gguf"
    path.write_bytes(b"not gguf at all" * 10)
    with pytest.raises(ValueError, match="junk.gguf"):
        import_gguf(str(path))


def test_direction_beyond_num_layers_is_refused(vector_file, tmp_path):
    path, _ = vector_file
    out = export_gguf(str(path), str(tmp_path / "v.gguf"))
    with pytest.raises(ValueError, match="direction.3"):
        import_gguf(out, num_layers=3)


def test_interrupted_write_leaves_no_file(vector_file, tmp_path, monkeypatch):
    path, _ = vector_file

    def fail(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", fail)
    out = tmp_path / "out" / "v.gguf"
    with pytest.raises(OSError, match="disk full"):
        export_gguf(str(path), str(out))
    assert not out.exists()
    assert list(out.parent.iterdir()) == []  # no temp file left behind either


def test_cli_export(vector_file, tmp_path):
    path, vector = vector_file
    out = tmp_path / "cli.gguf"
    assert cli.main(["export-gguf", "--vector_path", str(path), "--out", str(out), "--layers", "[2,3]"]) == 0
    _, tensors = read(out)
    assert set(tensors) == {"direction.1", "direction.2"}
    assert torch.equal(import_gguf(str(out), num_layers=NUM_LAYERS)[2:4], vector[2:4])
