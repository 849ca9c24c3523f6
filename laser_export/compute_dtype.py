"""``model.compute_dtype``: run the forward passes in another dtype than the one the weights are held in.

A CPU without native float16 arithmetic (AVX512-BF16 but no AVX512-FP16, like the machines this was
measured on) runs a float16 matmul several times slower than float32 and ~9× slower than bfloat16 (README,
*Big models*). The weights stay in ``model.dtype`` (what is reduced and exported, value for value); each
module's floating parameters and buffers are cast to the compute dtype just before its forward and put back
right after, so only one module's copy exists at a time. float16 → float32 is exact; float16 → bfloat16
rounds the weights (fewer mantissa bits) and is only used when the recipe asks for it.

``auto`` (the default) computes in the weights' dtype, except float16 weights on a CPU, which compute in
float32: the one line :func:`resolve` returns says so, and the report, manifest and card record it.
"""

from __future__ import annotations

import torch
from torch import nn

_MARK = "_laser_compute_dtype_hooks"


def resolve(requested: str, weights, device: torch.device) -> tuple[torch.dtype, str | None]:
    """(compute dtype, a one-line notice or None) for ``requested`` (auto | float32 | float16 | bfloat16)."""
    if requested != "auto":
        want = getattr(torch, requested)
        if want == torch.float16 and weights == torch.float16 and device.type == "cpu":
            return want, ("model.compute_dtype: float16 on a CPU computes without native fp16 arithmetic "
                          "(several times slower than float32 here); float32 keeps the weights' exact values")
        return want, None
    if weights == torch.float16 and device.type == "cpu":
        return torch.float32, ("model.dtype float16 on a CPU: no native fp16 arithmetic here, so the float16 "
                               "weights (kept exactly, exported as float16) are computed in float32 "
                               "(model.compute_dtype: float16 forces fp16 arithmetic)")
    return weights, None


def _pre(module: nn.Module, args):
    if torch.onnx.is_in_onnx_export():
        return
    dtype = getattr(module, _MARK)[0]
    saved = []
    for tensors in (module._parameters, module._buffers):
        for name, t in tensors.items():
            if t is not None and t.is_floating_point() and t.dtype != dtype:
                saved.append((t, t.data))
                t.data = t.data.to(dtype)
    module.__dict__["_laser_saved"] = saved
    return tuple(a.to(dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


def _post(module: nn.Module, args, output):
    for t, original in module.__dict__.pop("_laser_saved", ()):
        t.data = original


#: a Linear with more weights than this computes in row blocks of :data:`BLOCK_ROWS` output features, so its
#: compute-dtype copy is one block, not the whole matrix (GPT-J's 50400x4096 lm_head: 0.83 GB in float32)
BIG_LINEAR = 1 << 27
BLOCK_ROWS = 4096


def _embedding_post(module: nn.Module, args, output):
    """An embedding looks rows up in its own dtype; only the rows it returns are cast (exact: a lookup copies)."""
    dtype = getattr(module, _MARK)[0]
    return output.to(dtype) if torch.is_tensor(output) and output.is_floating_point() else output


def _blocked_linear(module: nn.Linear):
    """``module``'s forward in the compute dtype, one block of output features at a time."""
    original = module.forward

    def forward(x):
        if torch.onnx.is_in_onnx_export():
            return original(x)
        dtype = getattr(module, _MARK)[0]
        x, w, b = x.to(dtype), module.weight, module.bias
        return torch.cat([torch.nn.functional.linear(x, w[i : i + BLOCK_ROWS].to(dtype),
                                                     None if b is None else b[i : i + BLOCK_ROWS].to(dtype))
                          for i in range(0, w.shape[0], BLOCK_ROWS)], dim=-1)

    return forward


def install(model: nn.Module, dtype: torch.dtype) -> int:
    """Hook every module that holds floating tensors of another dtype (idempotent; new modules, e.g. the
    reduced ones, are hooked by calling it again). An ``nn.Embedding`` casts only the rows it returns; an
    ``nn.Linear`` over :data:`BIG_LINEAR` weights computes block by block. Returns how many modules were hooked."""
    n = 0
    for module in model.modules():
        if hasattr(module, _MARK):
            continue
        own = [*module._parameters.values(), *module._buffers.values()]
        if not any(t is not None and t.is_floating_point() and t.dtype != dtype for t in own):
            continue
        if type(module) is nn.Embedding:
            handles = (module.register_forward_hook(_embedding_post),)
        elif type(module) is nn.Linear and module.weight.numel() > BIG_LINEAR and not module._forward_hooks:
            module.forward = _blocked_linear(module)  # an instance attribute: nn.Module.__call__ finds it first
            handles = ()
        else:
            handles = (module.register_forward_pre_hook(_pre), module.register_forward_hook(_post, always_call=True))
        object.__setattr__(module, _MARK, (dtype, handles))
        n += 1
    return n


def remove(model: nn.Module) -> None:
    for module in model.modules():
        mark = module.__dict__.pop(_MARK, None)
        if mark is not None:
            for h in mark[1]:
                h.remove()
            module.__dict__.pop("forward", None)  # a blocked Linear's own forward again
