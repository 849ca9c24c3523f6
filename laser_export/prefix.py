"""Prefix cache: the hidden states entering block ℓ are computed once and reused for every candidate.

A LASER candidate at layer ℓ changes nothing before block ℓ, so the embeddings and blocks 0..ℓ-1 need
running only once per batch. :class:`PrefixCache` works with any family of the architecture table and
plugs into :func:`laser_export.evaluate.score_examples` through its ``forward_fn`` parameter, so the
batches (sorting, left padding, position ids) are exactly the scorer's own.

* :meth:`PrefixCache.capture` is a ``forward_fn`` that runs the model once per batch and records,
  with ``register_forward_pre_hook(..., with_kwargs=True)``, the positional and keyword inputs of every
  block from ``start`` on (hidden states, attention mask, rotary position embeddings, ...). It returns
  the model's own logits (so the capture pass *is* the baseline); with ``lazy_capture=True`` it runs
  only the base model and applies the LM head lazily too (~20% less work on SmolLM2).
* The first captured batch checks that replay is exactly the model's ``forward`` (replayed logits vs the
  full forward's, within 1e-5): a model whose ``forward`` transforms the logits beyond the final norm, the LM
  head and the family's soft-cap (remote code) is then captured with full forwards and never replayed
  (:attr:`PrefixCache.exact` False, :attr:`PrefixCache.inexact_reason` says why).
* :meth:`PrefixCache.replay(layer)` is a ``forward_fn`` that, for the same batches in the same order,
  runs blocks ``layer..L-1`` with the recorded inputs, then the final norm (``Family.final_norm``,
  relative to ``model.base_model``) and the LM head. The LM head is applied lazily, only to the
  positions the scorer reads (``logits[b, start:stop]``): the vocabulary projection is the most
  expensive part of a small model's forward and the scorer needs ~3 of ~20 positions per row.

Memory: everything for the whole scored set is kept (hidden states of each block ≥ ``start``); for
SmolLM2 on 1200 examples that is ~55 MB per block in fp32. Use one cache per scored set.

:meth:`PrefixCache.to_flat` / :meth:`PrefixCache.load_flat` turn the recorded batches into named tensors
plus a JSON structure (tensors, None, bools, numbers, strings in tuples/lists/dicts; anything else is refused)
and back, so the baseline cache can keep them in a safetensors file (no pickle).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .architectures import Family, layer_modules


class PrefixCacheError(RuntimeError):
    """Replay does not match the captured batches, or the model is not supported."""


class PrefixFormatError(PrefixCacheError):
    """Recorded inputs that cannot be flattened (a value of an unsupported type) or a malformed flat form."""


_TENSOR, _CONTAINERS = "T", ("tuple", "list", "dict")


def _encode(value, batch: int, tensors: dict, names: dict):
    """JSON-able form of one recorded input; tensors go to ``tensors`` once per object (shared ones stay shared)."""
    if isinstance(value, torch.Tensor):
        name = names.get(id(value))
        if name is None:
            name = names[id(value)] = f"b{batch}.{len(names)}"
            tensors[name] = value
        return {_TENSOR: name, "device": str(value.device)}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, tuple):
        return {"tuple": [_encode(v, batch, tensors, names) for v in value]}
    if isinstance(value, list):
        return {"list": [_encode(v, batch, tensors, names) for v in value]}
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {"dict": [[k, _encode(v, batch, tensors, names)] for k, v in value.items()]}
    raise PrefixFormatError(f"a block input of type {type(value).__name__} cannot be stored")


def _decode(form, tensors: dict):
    if form is None or isinstance(form, (bool, int, float, str)):
        return form
    if isinstance(form, dict) and len(form) == 2 and _TENSOR in form:
        t = tensors[form[_TENSOR]]  # KeyError: malformed
        return t if str(t.device) == form["device"] else t.to(form["device"])
    if isinstance(form, dict) and len(form) == 1:
        (kind, items), = form.items()
        if kind == "tuple":
            return tuple(_decode(v, tensors) for v in items)
        if kind == "list":
            return [_decode(v, tensors) for v in items]
        if kind == "dict":
            return {str(k): _decode(v, tensors) for k, v in items}
    raise PrefixFormatError(f"malformed stored block input {str(form)[:80]}")


@dataclass
class _Batch:
    input_ids: torch.Tensor
    inputs: dict[int, tuple[tuple, dict]] = field(default_factory=dict)  # block index -> (args, kwargs)


def _hidden_of(args: tuple, kwargs: dict) -> torch.Tensor:
    if args:
        return args[0]
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"]
    raise PrefixCacheError("cannot find the hidden states among a block's inputs")


def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden,) + tuple(args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _block_output(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


class _LazyLogits:
    """Final-normed hidden states that turn into logits only where indexed: ``x[b, i:j]``.

    The first access computes the logits of the last ``window`` positions of *every* row in one
    matrix product (the scorer reads the last prompt position and the answer tokens, which sit at
    the end of each left-padded row), so the LM-head weight is streamed once per batch, not per row.
    Accesses outside that window are computed on demand.
    """

    def __init__(self, hidden: torch.Tensor, norm: nn.Module | None, head: nn.Module, softcap: float | None,
                 window: int = 8):
        self.hidden, self.norm, self.head, self.softcap = hidden, norm, head, softcap
        self.shape = (*hidden.shape[:2], head.weight.shape[0])
        self.window = min(window, hidden.shape[1])
        self._tail: torch.Tensor | None = None

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        if self.norm is not None:
            h = self.norm(h)
        logits = self.head(h)
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def __getitem__(self, index):
        if not isinstance(index, tuple):
            index = (index,)
        width = self.shape[1]
        if len(index) >= 2 and isinstance(index[0], int) and isinstance(index[1], slice) and index[1].step in (None, 1):
            start, stop, _ = index[1].indices(width)
            lo = width - self.window
            if start >= lo and stop <= width:
                if self._tail is None:
                    with torch.inference_mode():
                        self._tail = self._logits(self.hidden[:, lo:])
                out = self._tail[index[0], start - lo : max(start, stop) - lo]
                return out[(Ellipsis, *index[2:])] if len(index) > 2 else out
        with torch.inference_mode():
            out = self._logits(self.hidden[index[:2]])
        return out[(Ellipsis, *index[2:])] if len(index) > 2 else out

    def materialize(self) -> torch.Tensor:
        with torch.inference_mode():
            return self._logits(self.hidden)


class PrefixCache:
    """Record block inputs from block ``start`` on during one full pass; replay from any layer ≥ start."""

    def __init__(self, model: nn.Module, family: Family, start: int, lazy_capture: bool = False,
                 replay_layers: "list[int] | None" = None):
        if family.task != "causal-lm":
            raise PrefixCacheError(f"prefix cache supports causal LMs; {family.name} is {family.task}")
        self.model, self.family = model, family
        self.blocks = layer_modules(model, family)
        n = len(self.blocks)
        if not 0 <= start < n:
            raise PrefixCacheError(f"start layer {start} out of range 0..{n - 1}")
        self.start = start
        self.lazy_capture = lazy_capture
        # hidden states are kept only where a replay may start (verify: the lowest reduced layer);
        # the other blocks' inputs are kept without them (mask, rotary embeddings: shared tensors)
        self.replay_layers = set(range(start, n)) if replay_layers is None else set(replay_layers)
        bad = [i for i in self.replay_layers if not start <= i < n]
        if bad:
            raise PrefixCacheError(f"replay layers {bad} outside {start}..{n - 1}")
        base = getattr(model, "base_model", model)
        self.norm = base.get_submodule(family.final_norm) if family.final_norm else None
        self.head = model.get_output_embeddings()
        if self.head is None:
            raise PrefixCacheError("model has no output embeddings (LM head)")
        cfg = getattr(model, "config", None)
        self.softcap = getattr(cfg, "final_logit_softcapping", None) if cfg is not None else None
        self.batches: list[_Batch] = []
        self._cursor = 0
        self._replay_layer: int | None = None
        #: replay == the model's own forward? None until the first captured batch checks it (see :meth:`capture`)
        self.exact: bool | None = None
        self.inexact_reason: str | None = None

    # -- capture -------------------------------------------------------------------------------
    def capture(self, model, input_ids, attention_mask, position_ids):
        """``forward_fn`` for the full pass: returns the model's logits and records block inputs."""
        batch = _Batch(input_ids.detach().cpu().clone())
        handles = []

        def make_hook(i):
            keep = i in self.replay_layers

            def hook(module, args, kwargs):
                if keep:
                    batch.inputs[i] = (tuple(args), dict(kwargs))
                elif args:
                    batch.inputs[i] = ((None, *args[1:]), dict(kwargs))
                else:
                    batch.inputs[i] = ((), {k: v for k, v in kwargs.items() if k != "hidden_states"})

            return hook

        for i in range(self.start, len(self.blocks)):
            handles.append(self.blocks[i].register_forward_pre_hook(make_hook(i), with_kwargs=True))
        try:
            if self.lazy_capture and self.exact:
                # body only (its output is already final-normed); the LM head runs lazily, like replay
                body = getattr(model, "base_model", model)
                out = body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
                logits = _LazyLogits(out.last_hidden_state, None, self.head, self.softcap)
            else:
                logits = model(
                    input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
                ).logits
        finally:
            for h in handles:
                h.remove()
        if len(batch.inputs) != len(self.blocks) - self.start:
            raise PrefixCacheError("not every block from the start layer was called during the forward pass")
        if self.exact is None:
            self._check_exact(batch, logits)
        self.batches.append(batch)
        return logits

    def _check_exact(self, batch: _Batch, logits: torch.Tensor) -> None:
        """On the first batch: does replaying the recorded blocks (final norm, LM head, the family's soft-cap)
        give the model's own ``forward`` logits within 1e-5 (relative to their scale; a few ulps for 16-bit
        logits)? A model whose ``forward`` transforms the logits further (remote code: a scale, another cap)
        fails: :attr:`exact` is False, every capture batch then runs the full forward (the baseline is the
        model's), and :meth:`replay` refuses."""
        layer = min(self.replay_layers)
        replayed = self.run_from(batch, layer).materialize()
        full = logits.detach()
        if replayed.shape != full.shape:
            diff, why = float("inf"), f"shape {tuple(replayed.shape)} vs {tuple(full.shape)}"
        else:
            diff = float((replayed.float() - full.float()).abs().max()) if full.numel() else 0.0
            why = f"max |replay - forward| {diff:.3g}"
        eps = torch.finfo(full.dtype).eps if full.dtype.is_floating_point else 0.0
        scale = max(1.0, float(full.float().abs().max())) if full.numel() else 1.0
        self.exact = diff <= max(1e-5, 4 * eps) * scale
        if not self.exact:
            self.inexact_reason = (f"replay from block {layer} is not {type(self.model).__name__}.forward "
                                   f"({why} on the first batch): full forwards")

    # -- replay --------------------------------------------------------------------------------
    def replay(self, layer: int):
        """A ``forward_fn`` that reruns blocks ``layer..L-1`` on the recorded batches, in order."""
        if not self.start <= layer < len(self.blocks) or layer not in self.replay_layers:
            raise PrefixCacheError(f"layer {layer} is not cached (replay layers: {sorted(self.replay_layers)})")
        if not self.batches:
            raise PrefixCacheError("nothing captured yet: score once with forward_fn=cache.capture")
        if self.exact is False:
            raise PrefixCacheError(self.inexact_reason or "replay is not the model's forward")
        self._cursor = 0

        def forward_fn(model, input_ids, attention_mask, position_ids):
            if self._cursor >= len(self.batches):
                self._cursor = 0  # a new scoring call over the same set
            batch = self.batches[self._cursor]
            if batch.input_ids.shape != input_ids.shape or not torch.equal(batch.input_ids, input_ids.cpu()):
                raise PrefixCacheError(
                    f"batch {self._cursor} differs from the captured one: replay must score the same examples "
                    "with the same tokenizer and batch size as the capture pass"
                )
            self._cursor += 1
            return self.run_from(batch, layer)

        return forward_fn

    def run_from(self, batch: _Batch, layer: int) -> _LazyLogits:
        with torch.inference_mode():
            args, kwargs = batch.inputs[layer]
            hidden = _hidden_of(args, kwargs)
            for i in range(layer, len(self.blocks)):
                a, kw = batch.inputs[i]
                a, kw = _with_hidden(a, kw, hidden)
                hidden = _block_output(self.blocks[i](*a, **kw))
        return _LazyLogits(hidden, self.norm, self.head, self.softcap)

    # -- flat form (persisted by the baseline cache) ------------------------------------------------
    def to_flat(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(named tensors, JSON-able structure) of the recorded batches; :meth:`load_flat` inverts it.

        Tensors are the recorded objects themselves (device and dtype as recorded; one entry per object
        per batch, so tensors shared between blocks stay shared). Raises :class:`PrefixFormatError` when
        an input is not a tensor, None, bool, number, string or a tuple/list/str-keyed dict of those."""
        tensors: dict[str, torch.Tensor] = {}
        batches = []
        for b, batch in enumerate(self.batches):
            names: dict[int, str] = {}
            batches.append({
                "input_ids": _encode(batch.input_ids, b, tensors, names),
                "inputs": [[i, _encode(args, b, tensors, names), _encode(kwargs, b, tensors, names)]
                           for i, (args, kwargs) in sorted(batch.inputs.items())],
            })
        return tensors, {"start": self.start, "replay_layers": sorted(self.replay_layers),
                         "n_blocks": len(self.blocks), "batches": batches}

    def load_flat(self, tensors: dict[str, torch.Tensor], structure: dict) -> None:
        """Replace the recorded batches by a :meth:`to_flat` form, after checking it fits this cache:
        same start, replay layers and block count, every block from ``start`` on in every batch, hidden
        states at each replay layer with the batch's [batch, seq] shape. Raises :class:`PrefixFormatError`."""
        try:
            mine = {"start": self.start, "replay_layers": sorted(self.replay_layers), "n_blocks": len(self.blocks)}
            theirs = {k: structure[k] for k in mine}
            if theirs != mine:
                raise PrefixFormatError(f"stored prefix is for {theirs}, this cache is {mine}")
            batches = []
            for form in structure["batches"]:
                batch = _Batch(_decode(form["input_ids"], tensors))
                if not isinstance(batch.input_ids, torch.Tensor) or batch.input_ids.dim() != 2:
                    raise PrefixFormatError("stored input_ids are not a [batch, seq] tensor")
                for i, args, kwargs in form["inputs"]:
                    args, kwargs = _decode(args, tensors), _decode(kwargs, tensors)
                    if not isinstance(args, tuple) or not isinstance(kwargs, dict):
                        raise PrefixFormatError(f"block {i}: stored inputs are not (args, kwargs)")
                    batch.inputs[int(i)] = (args, kwargs)
                if sorted(batch.inputs) != list(range(self.start, len(self.blocks))):
                    raise PrefixFormatError(f"a stored batch lacks blocks {self.start}..{len(self.blocks) - 1}")
                for i in self.replay_layers:
                    hidden = _hidden_of(*batch.inputs[i])
                    if not isinstance(hidden, torch.Tensor) or tuple(hidden.shape[:2]) != tuple(batch.input_ids.shape):
                        raise PrefixFormatError(f"block {i}: stored hidden states do not match the batch's input_ids")
                batches.append(batch)
        except PrefixCacheError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise PrefixFormatError(f"malformed stored prefix ({type(err).__name__}: {err})") from None
        self.batches = batches
        self._cursor = 0

    def __len__(self) -> int:
        return len(self.batches)

    def __bool__(self) -> bool:  # an empty cache is still a cache: `cache or default` must keep it
        return True

    def nbytes(self) -> int:
        total = 0
        for b in self.batches:
            for args, _ in b.inputs.values():
                total += sum(a.numel() * a.element_size() for a in args if isinstance(a, torch.Tensor))
            # kwargs tensors (masks, rotary embeddings) are shared between blocks: count them once per batch
            seen = {}
            for _, kw in b.inputs.values():
                for v in kw.values():
                    for t in (v if isinstance(v, (tuple, list)) else (v,)):
                        if isinstance(t, torch.Tensor):
                            seen[id(t)] = t.numel() * t.element_size()
            total += sum(seen.values())
        return total
