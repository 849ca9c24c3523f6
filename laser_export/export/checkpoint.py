"""Names of a safetensors checkpoint (as ``save_pretrained`` writes it) and the error of a checkpoint that fails
its checks. Imported by the shard writer, the read-back and the in-memory writer; imports nothing of theirs."""

from __future__ import annotations

import torch

from ..errors import CheckFailed

INDEX = "model.safetensors.index.json"
WEIGHTS = "model.safetensors"
SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
FROM_SAFETENSORS = {v: k for k, v in SAFETENSORS_DTYPES.items()}


class ExportError(CheckFailed):
    """An export that failed a check (a checkpoint that does not read back as written, ...): nothing exported."""
