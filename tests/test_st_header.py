"""One safetensors header parser for sources and exports (laser_export/st_header.py)."""

import struct

import pytest
import torch
from safetensors.torch import save_file

from laser_export.errors import CheckFailed, InputError
from laser_export.export.readback import read_header
from laser_export.sources import check_safetensors_file
from laser_export.st_header import HeaderError, parse


def _raw(tmp_path, header: bytes, data: bytes = b"", n=None):
    p = tmp_path / "x.safetensors"
    p.write_bytes(struct.pack("<Q", len(header) if n is None else n) + header + data)
    return p


def _short(tmp_path):
    (tmp_path / "x.safetensors").write_bytes(b"abc")
    return tmp_path / "x.safetensors"


@pytest.mark.parametrize("make, reason", [
    (lambda t: _short(t), "shorter than its 8-byte"),
    (lambda t: _raw(t, b"{}", n=10**12), "header length 1000000000000 is impossible"),
    (lambda t: _raw(t, b"{not json"), "not JSON"),
    (lambda t: _raw(t, b"[1, 2]"), "not an object"),
    (lambda t: _raw(t, b"[" * 5000 + b"]" * 5000), "not"),
])
def test_every_caller_gets_the_same_reason(tmp_path, make, reason):
    path = make(tmp_path)
    with pytest.raises(HeaderError, match=reason):
        parse(path)
    with pytest.raises(InputError, match=reason):  # a model source: exit 2
        check_safetensors_file(path)
    with pytest.raises(CheckFailed, match=reason):  # an export's read-back: exit 1
        read_header(path)


def test_a_real_file_parses(tmp_path):
    save_file({"w": torch.ones(2, 3)}, str(tmp_path / "m.safetensors"), metadata={"format": "pt"})
    header, n, size = parse(tmp_path / "m.safetensors")
    assert header["w"]["shape"] == [2, 3] and header["__metadata__"] == {"format": "pt"} and size == 8 + n + 24
    assert check_safetensors_file(tmp_path / "m.safetensors")["w"]["dtype"] == "F32"
    assert read_header(tmp_path / "m.safetensors") == ({"w": header["w"]}, 24)
