"""Collateral cost of an intervention: perplexity of a causal LM on general text.

The text is a ``datasets`` dataset (default ``wikitext`` / ``wikitext-2-raw-v1`` / ``test``, the
``text`` column) or local files: a folder of ``*.txt`` files, a single ``.txt`` file, or a local copy
of the Hub dataset in its own layout (see :mod:`laser_export.benchmarks.hub`). Rows are joined with
``"\\n\\n"`` (the usual wikitext convention), tokenised once (with BOS if the tokenizer adds one),
cut to ``max_tokens`` and scored with the sliding-window method of the transformers docs: windows of
``context`` tokens advancing by ``stride``; each token is predicted once, with up to
``context - stride`` tokens of left context it shares with the previous window. Perplexity =
exp(mean negative log-likelihood per predicted token).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .benchmarks.base import BenchmarkError
from .inputs import read_text


@dataclass(frozen=True)
class PerplexityOptions:
    dataset: str = "wikitext"
    config: str | None = "wikitext-2-raw-v1"
    split: str = "test"
    path: str | os.PathLike | None = None
    max_tokens: int = 20_000
    context: int = 1024
    stride: int = 512


def load_text(opts: PerplexityOptions) -> str:
    """The text to score, from local files (``opts.path``) or the Hub dataset."""
    if opts.path is not None:
        p = Path(opts.path).expanduser()
        if p.is_file():
            return read_text(p, "perplexity.path")
        if p.is_dir():
            txt = sorted(p.glob("*.txt"))
            if txt:
                return "\n\n".join(read_text(f, "perplexity.path") for f in txt)
        elif not p.exists():
            raise BenchmarkError(f"perplexity.path: {p} does not exist")
        else:
            raise BenchmarkError(f"perplexity.path: {p} is not a regular file or folder (a FIFO, device or socket)")
    from .benchmarks.hub import load_rows

    rows = load_rows("perplexity", opts.dataset, opts.config, opts.split, opts.path)
    if rows and "text" not in rows[0]:
        raise BenchmarkError(f"perplexity: {opts.dataset} has no 'text' column (has {', '.join(rows[0])})")
    return "\n\n".join(r["text"] for r in rows)


def token_ids(tokenizer, text: str, max_tokens: int) -> list[int]:
    from .evaluate import _prompt_ids

    ids = _prompt_ids(tokenizer, text)
    return ids[:max_tokens]


def perplexity(model, ids: list[int], *, context: int = 1024, stride: int = 512, progress: bool = True) -> dict:
    """Sliding-window perplexity of ``model`` on the token ``ids`` (see the module docstring)."""
    if not 0 < stride <= context:
        raise ValueError(f"perplexity: need 0 < stride <= context, got stride {stride}, context {context}")
    if len(ids) < 2:
        raise ValueError("perplexity: the text has fewer than 2 tokens")
    from .evaluate import _model_device, scoring

    device = _model_device(model)
    seq = torch.tensor(ids, dtype=torch.long)
    nll, counted, prev_end = 0.0, 0, 0
    starts = list(range(0, len(ids), stride))
    with scoring(model, progress=progress, description="perplexity", total=len(starts), unit="windows") as advance:
        for begin in starts:
            end = min(begin + context, len(ids))
            window = seq[begin:end]
            # tokens at positions max(prev_end, begin + 1)..end-1 are predicted in this window
            first = max(prev_end, begin + 1)
            if first < end:
                logits = model(input_ids=window[None].to(device), use_cache=False).logits[0].float().cpu()
                logp = torch.log_softmax(logits[first - begin - 1 : end - begin - 1], dim=-1)
                target = window[first - begin : end - begin]
                nll -= float(logp.gather(1, target[:, None]).sum())
                counted += end - first
            prev_end = end
            advance()
            if end == len(ids):
                break
    mean = nll / counted
    return {"perplexity": math.exp(mean), "nll_per_token": mean, "n_tokens": counted}


__all__ = ["PerplexityOptions", "load_text", "perplexity", "token_ids"]
