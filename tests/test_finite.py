"""Counting inf/NaN in chunks by exponent bits (laser_export/finite.py) equals torch.isfinite, for every float type."""

import pytest
import torch

from laser_export import finite


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_counts_equal_isfinite(dtype, monkeypatch):
    monkeypatch.setattr(finite, "CHUNK", 1000)  # several chunks, a partial last one
    t = torch.randn(37, 101).to(dtype)
    assert finite.count_nonfinite(t) == 0
    flat = t.view(-1)
    flat[[0, 999, 1000, 3736]] = torch.tensor([float("inf"), float("-inf"), float("nan"), float("nan")], dtype=dtype)
    assert finite.count_nonfinite(t) == int((~torch.isfinite(t)).sum()) == 4
    assert finite.count_nonfinite(t.t()) == 4  # not contiguous
    assert finite.count_nonfinite(torch.ones(3, dtype=torch.int64)) == 0


def test_overflows_are_values_finite_now_and_not_after_the_cast(monkeypatch):
    monkeypatch.setattr(finite, "CHUNK", 7)
    t = torch.tensor([1.0, 70000.0, -1e6, float("inf"), 3.0, 65504.0, 1e-9] * 3)
    want = int((torch.isfinite(t) & ~torch.isfinite(t.to(torch.float16))).sum())
    assert finite.count_overflows(t, torch.float16) == want == 6
    assert finite.count_overflows(t, torch.bfloat16) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_read_back_finds_a_non_finite_value_in_any_read_chunk(tmp_path, monkeypatch, dtype):
    """The read-back reads each tensor in chunks into one buffer (no memory map): a value in a later chunk of a
    later tensor is still found and named."""
    from safetensors.torch import save_file

    from laser_export.export import readback
    from laser_export.export.checkpoint import ExportError

    monkeypatch.setattr(readback, "READ_CHUNK", 64)
    b = torch.ones(100, dtype=dtype)
    save_file({"a": torch.ones(50, dtype=dtype), "b": b}, str(tmp_path / "model.safetensors"))
    assert readback.read_back(tmp_path).tensor_bytes == 150 * b.element_size()
    b[97] = float("nan")
    save_file({"a": torch.ones(50, dtype=dtype), "b": b}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ExportError, match=r"tensor b \(.*\) holds 1 non-finite values \(inf/NaN\) of 100"):
        readback.read_back(tmp_path)
