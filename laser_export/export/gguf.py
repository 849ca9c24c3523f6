"""GGUF: name a GGUF source's quantization, and write a dense export as a GGUF file (``export.formats: [gguf]``).

Writing uses the ``gguf`` package (llama.cpp's own writer) and its tensor-name map for the family's
``gguf_arch``; only dense storage can be written (llama.cpp has no factorised layers). Tensors are written in
the export dtype (F32 / F16 / BF16). The file carries the architecture hyper-parameters and, when the model
came from a GGUF file, that file's tokenizer metadata, so llama.cpp, Ollama and
``from_pretrained(folder, gguf_file=...)`` load it.
"""

from __future__ import annotations

from pathlib import Path


def gguf_quantization(path: str | Path) -> str | None:
    """The GGUF file type (e.g. ``Q4_1``, ``F16``) from ``general.file_type``; None when absent/unreadable."""
    try:
        import gguf

        reader = gguf.GGUFReader(str(path))
        field = reader.fields.get("general.file_type")
        if field is None:
            return None
        return gguf.LlamaFileType(int(field.parts[field.data[0]][0])).name.removeprefix("MOSTLY_")
    except (ImportError, OSError, ValueError, KeyError, IndexError):
        return None
