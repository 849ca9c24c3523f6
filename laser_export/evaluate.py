"""The scorers: batched scoring of a Hugging Face causal or masked LM on benchmark examples (which scorer
a family uses on a benchmark: :mod:`laser_export.selection`; confidence intervals: :mod:`laser_export.stats`).

Every (example, candidate) pair becomes one row: the prompt token ids (with the tokenizer's BOS if it
adds one) followed by the ids of ``" " + candidate`` tokenised on its own without special tokens.
Rows are left-padded into batches with an attention mask and ``position_ids = cumsum(mask) - 1``
(clipped at 0), so batched results equal batch-size-1 results. One forward pass per batch gives both
the next-token distribution at the last prompt position (top-k metrics) and the teacher-forced
log-prob of each candidate's tokens. Matching is done on token ids of the answer alone — never on
decoded text containing the prompt.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import torch

from . import metrics as _metrics
from .benchmarks.base import BenchmarkError, Example

ARTICLE_WORDS = ("a", "an", "the", "A", "An", "The")
_LEADING_ARTICLE = re.compile(r"^(?:a|an|the)\s+(?=\S)", re.IGNORECASE)
TOPK = (1, 5, 10)

# Metrics averaged into ScoreResult.metrics (when present in at least one example): the metrics table.
_MEAN_METRICS = _metrics.ALL


@dataclass
class ScoreResult:
    """Per-example scores (in the order of the examples) and their means.

    ``metrics`` holds the mean of each metric over the examples that have it (``accuracy`` only for
    choice examples, ``top5``/``top10``/``top1_no_article`` only for generative ones; ``top1`` for all)
    plus ``n``, the number of examples.
    """

    per_example: list[dict]
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def ids(self) -> list[str]:
        return [row["id"] for row in self.per_example]

    def hits(self, metric: str) -> np.ndarray:
        """Per-example values of ``metric`` (examples lacking it are skipped), for bootstrapping."""
        values = [row[metric] for row in self.per_example if metric in row]
        if not values and self.per_example:
            raise KeyError(f"no example has metric {metric!r}")
        if values and all(isinstance(v, (bool, np.bool_)) for v in values):
            return np.asarray(values, dtype=bool)
        return np.asarray(values, dtype=np.float64)


def _forward_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """The single model call (replaceable, e.g. by a prefix cache). Returns [batch, seq, vocab] logits."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    return out.logits


def _encode(tokenizer, text: str, add_special_tokens: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def _prompt_ids(tokenizer, prompt: str) -> list[int]:
    """Prompt ids, prefixed with BOS only if the tokenizer adds one (never a trailing EOS)."""
    plain = _encode(tokenizer, prompt, False)
    bos = tokenizer.bos_token_id
    if bos is not None:
        special = _encode(tokenizer, prompt, True)
        if special[:1] == [bos] and plain[:1] != [bos]:
            return [bos] + plain
    return plain


def _continuation_ids(tokenizer, text: str) -> list[int]:
    return _encode(tokenizer, " " + text, False)


def article_token_ids(tokenizer) -> list[int]:
    """Ids of single-token articles (" a", " an", " the", capitalised, with and without the space)."""
    ids: set[int] = set()
    for word in ARTICLE_WORDS:
        for form in (" " + word, word):
            toks = _encode(tokenizer, form, False)
            if len(toks) == 1:
                ids.add(toks[0])
    return sorted(ids)


def _first_stripped(tokenizer, ex: Example, answer: str) -> int:
    """First token of the answer without its leading article (the top1_no_article target)."""
    ids = _continuation_ids(tokenizer, strip_leading_article(answer))
    if not ids:
        raise BenchmarkError(f"example {ex.id!r}: answer {answer!r} without its leading article tokenises to nothing")
    return ids[0]


def strip_leading_article(answer: str) -> str:
    """``"the French language"`` → ``"French language"``; an answer that is only an article is kept."""
    return _LEADING_ARTICLE.sub("", answer, count=1)


@dataclass
class _Row:
    ex: int  # example index
    cand: int  # answer or choice index
    prompt: list[int]
    cont: list[int]

    @property
    def length(self) -> int:  # the last continuation token is never an input
        return len(self.prompt) + len(self.cont) - 1


def _model_device(model) -> torch.device:
    dev = getattr(model, "device", None)
    if isinstance(dev, torch.device):
        return dev
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


@contextmanager
def scoring(model, *, progress: bool, description: str, total: int, unit: str = "examples"):
    """The frame of every scoring loop: ``model`` in eval mode (its training flag restored after),
    inference mode, and the progress bar (:func:`laser_export.progress.bar`) of ``total`` ``unit``.
    Yields ``advance(n=1)``."""
    from .progress import bar

    was_training = getattr(model, "training", False)
    model.eval()
    try:
        with bar("", enabled=progress, unit=unit, elapsed=False, transient=True) as pbar, torch.inference_mode():
            task = pbar.add_task(description, total=total)
            yield lambda n=1: pbar.advance(task, n)
    finally:
        if was_training:
            model.train()


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")


def _length_batches(seqs: Sequence[Sequence[int]], batch_size: int) -> Iterator[list[int]]:
    """Indices of ``seqs`` in batches of ``batch_size``, longest first (less padding per batch)."""
    order = sorted(range(len(seqs)), key=lambda r: -len(seqs[r]))
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def _pad(seqs: Sequence[Sequence[int]], pad_id: int, *, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) of ``seqs`` padded with ``pad_id`` to the longest: on the left (causal LMs,
    so the last prompt token is at the end of every row) or on the right (masked LMs)."""
    width = max(len(q) for q in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for b, q in enumerate(seqs):
        where = slice(width - len(q), width) if left else slice(0, len(q))
        ids[b, where] = torch.tensor(q, dtype=torch.long)
        mask[b, where] = 1
    return ids, mask


def _masked_batches(model, rows: Sequence[Sequence[int]], read, *, pad_id: int, batch_size: int, forward_fn,
                    progress: bool, description: str) -> None:
    """Every row (one per example) through a masked LM in right-padded length batches;
    ``read(batch indices, ids, logits)`` takes what it needs from each batch's [batch, seq, vocab] logits.
    ``forward_fn(model, input_ids, attention_mask)`` replaces the model call."""
    device = _model_device(model)
    call = forward_fn or (lambda m, i, a: m(input_ids=i, attention_mask=a).logits)
    with scoring(model, progress=progress, description=description, total=len(rows)) as advance:
        for batch in _length_batches(rows, batch_size):
            ids, mask = _pad([rows[r] for r in batch], pad_id, left=False)
            read(batch, ids, call(model, ids.to(device), mask.to(device)))
            advance(len(batch))


def _candidates(ex: Example) -> Sequence[str]:
    """An example's answers (generative) or choices, checked: one at least, a label among the choices."""
    candidates = ex.choices if ex.is_choice else ex.answers
    if not candidates:
        raise ValueError(f"example {ex.id!r} has no answers/choices")
    if ex.is_choice and not (ex.label is not None and 0 <= ex.label < len(ex.choices)):
        raise ValueError(f"example {ex.id!r}: label {ex.label!r} is not an index into its choices")
    return candidates


def _first_token_hits(row: dict, top: list[int], masked_argmax: int, firsts: Sequence[int],
                      stripped: Sequence[int]) -> None:
    """The next-token metrics of a generative example: top-k hits of an accepted answer's first token,
    top-1 with articles excluded (``masked_argmax``) against the article-stripped answers."""
    for k in TOPK:
        row[f"top{k}"] = any(t in top[:k] for t in firsts)
    row["top1_no_article"] = any(t == masked_argmax for t in stripped)


def _top_and_masked_argmax(logits: torch.Tensor, articles: torch.Tensor) -> tuple[list[int], int]:
    """(top-10 ids, argmax with the article tokens excluded) of one next-token distribution."""
    top = torch.topk(logits, k=min(max(TOPK), logits.numel())).indices.tolist()
    masked = logits.clone()
    if len(articles):
        masked[articles] = float("-inf")
    return top, int(masked.argmax())


def _generation_rows(tokenizer, examples: Sequence[Example], generated: dict[int, list[int]]) -> list[dict]:
    """exact_match / contains / f1 of each example's generated token ids (see :func:`score_generate`)."""
    per_example = []
    for i, ex in enumerate(examples):
        text = tokenizer.decode(generated[i], skip_special_tokens=True)
        gen, answers = _normalise(text), [_normalise(a) for a in ex.answers]
        per_example.append({
            "id": ex.id,
            "generation": text,
            "exact_match": any(gen == a for a in answers),
            "contains": any(a in gen for a in answers),
            "f1": max(token_f1(text, a) for a in ex.answers),
        })
    return per_example


def score_examples(
    model,
    tokenizer,
    examples: Sequence[Example],
    *,
    batch_size: int = 16,
    progress: bool = True,
    description: str = "scoring",
    forward_fn=None,
) -> ScoreResult:
    """Score ``examples`` with a causal LM. See the module docstring and README for the metrics.

    ``forward_fn(model, input_ids, attention_mask, position_ids)`` replaces the model call (default
    :func:`_forward_logits`), e.g. by a prefix cache; it must return something indexable like
    ``logits[b, start:stop]`` ([batch, seq, vocab] logits).
    """
    _check_batch_size(batch_size)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("tokenizer has neither a pad nor an eos token to pad with")
    rows, answer_first, stripped_first = _causal_rows(tokenizer, examples)
    scored = _score_causal_rows(model, examples, rows, pad_id, article_token_ids(tokenizer), batch_size=batch_size,
                                progress=progress, description=description, forward_fn=forward_fn)
    per_example = [_causal_result(tokenizer, i, ex, scored, answer_first[i], stripped_first[i])
                   for i, ex in enumerate(examples)]
    return ScoreResult(per_example=per_example, metrics=_means(per_example))


def _causal_rows(tokenizer, examples: Sequence[Example]) -> tuple[list[_Row], list[list[int]], list[list[int]]]:
    """One row per (example, candidate); per example the first token of each answer and of each
    article-stripped answer (empty for choice examples)."""
    rows: list[_Row] = []
    answer_first: list[list[int]] = []
    stripped_first: list[list[int]] = []
    for i, ex in enumerate(examples):
        prompt = _prompt_ids(tokenizer, ex.prompt)
        if not prompt:
            raise BenchmarkError(f"example {ex.id!r}: prompt tokenises to nothing and the tokenizer adds no BOS")
        candidates = _candidates(ex)
        for j, cand in enumerate(candidates):
            cont = _continuation_ids(tokenizer, cand)
            if not cont:
                raise BenchmarkError(f"example {ex.id!r}: answer/choice {cand!r} tokenises to nothing")
            rows.append(_Row(i, j, prompt, cont))
        answer_first.append([] if ex.is_choice else [r.cont[0] for r in rows[-len(candidates) :]])
        stripped_first.append(
            [] if ex.is_choice else [_first_stripped(tokenizer, ex, a) for a in ex.answers]
        )
    return rows, answer_first, stripped_first


@dataclass
class _CausalScores:
    logprob: dict = field(default_factory=dict)  # (example, candidate) -> summed log-prob
    ntok: dict = field(default_factory=dict)  # (example, candidate) -> answer tokens
    next_token: dict = field(default_factory=dict)  # example -> (top-10 ids, argmax without articles)


def _score_causal_rows(model, examples, rows: list[_Row], pad_id: int, articles: list[int], *, batch_size: int,
                       progress: bool, description: str, forward_fn) -> _CausalScores:
    """The batch loop: length-sorted, left-padded batches; progress counted in examples (an example is
    done when the last of its rows, possibly in another batch, is scored)."""
    out = _CausalScores()
    rows_left = [0] * len(examples)
    for r in rows:
        rows_left[r.ex] += 1
    seqs = [r.prompt + r.cont[:-1] for r in rows]  # the last continuation token is never an input
    device = _model_device(model)
    article_idx = torch.tensor(articles, dtype=torch.long)
    with scoring(model, progress=progress, description=description, total=len(examples)) as advance:
        for batch_idx in _length_batches(seqs, batch_size):
            batch = [rows[r] for r in batch_idx]
            ids, mask = _pad([seqs[r] for r in batch_idx], pad_id, left=True)
            width = ids.shape[1]
            position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = (forward_fn or _forward_logits)(model, ids.to(device), mask.to(device), position_ids.to(device))
            done = 0
            for b, r in enumerate(batch):
                first = width - r.length + len(r.prompt) - 1  # last prompt position
                row_logits = logits[b, first : first + len(r.cont)].float().cpu()
                logp = torch.log_softmax(row_logits, dim=-1)
                cont = torch.tensor(r.cont, dtype=torch.long)
                out.logprob[(r.ex, r.cand)] = float(logp.gather(1, cont[:, None]).sum())
                out.ntok[(r.ex, r.cand)] = len(r.cont)
                if r.cand == 0 and not examples[r.ex].is_choice:
                    out.next_token[r.ex] = _top_and_masked_argmax(row_logits[0], article_idx)
                rows_left[r.ex] -= 1
                done += rows_left[r.ex] == 0
            advance(done)
    return out


def _causal_result(tokenizer, i: int, ex: Example, scored: _CausalScores, firsts: list[int],
                   stripped: list[int]) -> dict:
    row: dict = {"id": ex.id}
    if ex.is_choice:
        lps = [scored.logprob[(i, j)] for j in range(len(ex.choices))]
        pred = int(np.argmax(lps))
        row.update(choice_logprobs=lps, prediction=pred, label=ex.label, accuracy=pred == ex.label,
                   top1=pred == ex.label)
        return row
    top, masked_argmax = scored.next_token[i]
    _first_token_hits(row, top, masked_argmax, firsts, stripped)
    best = max(range(len(ex.answers)), key=lambda j: scored.logprob[(i, j)])
    row["logprob"] = scored.logprob[(i, best)]
    row["n_answer_tokens"] = scored.ntok[(i, best)]
    row["logloss"] = -row["logprob"] / row["n_answer_tokens"]
    row["predicted_token"] = tokenizer.decode([top[0]])
    return row


def score_masked(
    model,
    tokenizer,
    examples: Sequence[Example],
    *,
    batch_size: int = 16,
    progress: bool = True,
    description: str = "scoring",
    forward_fn=None,
) -> ScoreResult:
    """Score ``examples`` with a masked LM in the paper's protocol (its ``intervention_roberta_*.py``).

    Each example becomes one row: :meth:`Example.masked_text` (the prompt followed by the mask
    token, or the paper's RoBERTa wording) with the tokenizer's special tokens; exactly one mask
    token per row. A row longer than ``tokenizer.model_max_length`` keeps its first token and its end
    (the paper kept the last 50 tokens of a bio). Rows are right-padded with the pad token and an attention mask (RoBERTa derives
    positions from non-pad ids, BERT counts from 0: both unchanged by right padding), so batched
    results equal batch size 1. One forward pass per batch; the log-softmax at the mask position gives

    - generative examples: ``top1/5/10`` (an accepted answer's first token, ``" " + answer`` without
      special tokens, is in the top-k), ``top1_no_article`` (articles excluded from the argmax, the
      answer's leading article dropped), ``logprob`` (log-prob of that first token: one mask predicts one
      token), ``logloss`` = −logprob;
    - choice examples: the choice whose first token has the highest log-prob at the mask is the
      prediction (``accuracy`` = ``top1``); ``logprob``/``logloss`` of the correct choice's token.

    ``forward_fn(model, input_ids, attention_mask)`` replaces the model call; returns [batch, seq, vocab].
    """
    _check_batch_size(batch_size)
    mask_id, mask_token = tokenizer.mask_token_id, tokenizer.mask_token
    if mask_id is None or mask_token is None:
        raise ValueError("masked-LM scoring needs a tokenizer with a mask token")
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        raise ValueError("masked-LM scoring needs a tokenizer with a pad token")
    articles = torch.tensor(article_token_ids(tokenizer), dtype=torch.long)
    rows, at, targets, stripped = _masked_rows(tokenizer, examples, mask_id, mask_token)
    at_mask: dict[int, torch.Tensor] = {}  # example -> log-probs at the mask (vocab,)

    def read(batch, ids, logits):
        for b, r in enumerate(batch):
            at_mask[r] = torch.log_softmax(logits[b, at[r]].float().cpu(), dim=-1)

    _masked_batches(model, rows, read, pad_id=pad_id, batch_size=batch_size, forward_fn=forward_fn,
                    progress=progress, description=description)
    per_example = [_masked_result(tokenizer, ex, at_mask[i], targets[i], stripped[i], articles)
                   for i, ex in enumerate(examples)]
    return ScoreResult(per_example=per_example, metrics=_means(per_example))


def _masked_rows(tokenizer, examples: Sequence[Example], mask_id: int, mask_token: str):
    """Per example: its ids (one mask token), the mask position, the first token of each answer/choice
    and of each article-stripped answer."""
    rows: list[list[int]] = []
    at: list[int] = []
    targets: list[list[int]] = []
    stripped: list[list[int]] = []
    limit = getattr(tokenizer, "model_max_length", None)
    limit = limit if isinstance(limit, int) and 2 < limit < 1_000_000 else None
    for ex in examples:
        ids = _encode(tokenizer, ex.masked_text(mask_token), True)
        if limit is not None and len(ids) > limit:  # keep the first (special) token and the end, where the mask is
            ids = ids[:1] + ids[len(ids) - limit + 1 :]
        where = [i for i, t in enumerate(ids) if t == mask_id]
        if len(where) != 1:
            raise ValueError(f"example {ex.id!r}: masked prompt has {len(where)} mask tokens, expected exactly 1")
        rows.append(ids)
        at.append(where[0])
        firsts = []
        for cand in _candidates(ex):
            cont = _continuation_ids(tokenizer, cand)
            if not cont:
                raise BenchmarkError(f"example {ex.id!r}: answer/choice {cand!r} tokenises to nothing")
            firsts.append(cont[0])
        if ex.is_choice and len(set(firsts)) != len(firsts):
            raise ValueError(
                f"example {ex.id!r}: choices {list(ex.choices)} share a first token; a single mask cannot tell them apart"
            )
        targets.append(firsts)
        stripped.append([] if ex.is_choice else [_first_stripped(tokenizer, ex, a) for a in ex.answers])
    return rows, at, targets, stripped


def _masked_result(tokenizer, ex: Example, logp: torch.Tensor, targets: list[int], stripped: list[int],
                   articles: torch.Tensor) -> dict:
    row: dict = {"id": ex.id}
    if ex.is_choice:
        lps = [float(logp[t]) for t in targets]
        pred = int(np.argmax(lps))
        row.update(choice_logprobs=lps, prediction=pred, label=ex.label, accuracy=pred == ex.label,
                   top1=pred == ex.label, logprob=lps[ex.label], logloss=-lps[ex.label])
        return row
    top, masked_argmax = _top_and_masked_argmax(logp, articles)
    _first_token_hits(row, top, masked_argmax, targets, stripped)
    row["logprob"] = max(float(logp[t]) for t in targets)
    row["n_answer_tokens"] = 1
    row["logloss"] = -row["logprob"]
    row["predicted_token"] = tokenizer.decode([top[0]])
    return row


_PUNCT = re.compile(r"[^\w\s]")


def _normalise(text: str) -> str:
    return " ".join(text.strip().lower().split())


def _bag(text: str) -> set[str]:
    return set(_PUNCT.sub(" ", _normalise(text)).split())


def token_f1(generation: str, answer: str) -> float:
    """The paper's bag-of-words F1 (sets of lower-cased words; punctuation split off)."""
    gen, ans = _bag(generation), _bag(answer)
    common = len(gen & ans)
    p, r = common / max(1, len(gen)), common / max(1, len(ans))
    return 2 * p * r / max(1e-12, p + r) if common else 0.0


def score_generate(
    model,
    tokenizer,
    examples: Sequence[Example],
    *,
    batch_size: int = 16,
    progress: bool = True,
    description: str = "generating",
    max_new_tokens: int = 15,
    forward_fn=None,
) -> ScoreResult:
    """Greedy generation, batched with left padding (the paper's HotpotQA protocol).

    Each prompt (with BOS if the tokenizer adds one) is continued greedily for at most
    ``max_new_tokens`` tokens (at least 1, stopping at EOS); only the *new* tokens are decoded. Per
    example, with answers and generation lower-cased and whitespace-normalised:
    ``exact_match`` (generation equals an accepted answer), ``contains`` (an answer occurs in the
    generation: the paper's accuracy, without its bug of searching the decoded prompt too) and
    ``f1`` (bag-of-words F1, best over answers). ``forward_fn`` is accepted for a uniform
    interface and must be None (generation runs the whole model)."""
    if forward_fn is not None:
        raise ValueError("the generate scorer runs the whole model; forward_fn is not supported")
    _check_batch_size(batch_size)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("tokenizer has neither a pad nor an eos token to pad with")
    prompts = []
    for ex in examples:
        if ex.is_choice:
            raise ValueError(f"example {ex.id!r}: the generate scorer scores answers, not choices")
        ids = _prompt_ids(tokenizer, ex.prompt)
        if not ids:
            raise BenchmarkError(f"example {ex.id!r}: prompt tokenises to nothing and the tokenizer adds no BOS")
        prompts.append(ids)
    generated: dict[int, list[int]] = {}
    device = _model_device(model)
    with scoring(model, progress=progress, description=description, total=len(prompts)) as advance:
        for batch in _length_batches(prompts, batch_size):
            ids, mask = _pad([prompts[r] for r in batch], pad_id, left=True)
            width = ids.shape[1]
            out = model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                min_new_tokens=1, do_sample=False, num_beams=1, pad_token_id=pad_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            for b, r in enumerate(batch):
                new = out[b, width:].tolist()
                if tokenizer.eos_token_id is not None and tokenizer.eos_token_id in new:
                    new = new[: new.index(tokenizer.eos_token_id)]
                generated[r] = new
            advance(len(batch))
    per_example = _generation_rows(tokenizer, examples, generated)
    return ScoreResult(per_example=per_example, metrics=_means(per_example))


def score_masked_generate(
    model,
    tokenizer,
    examples: Sequence[Example],
    *,
    batch_size: int = 16,
    progress: bool = True,
    description: str = "filling masks",
    n_masks: int = 5,
    forward_fn=None,
) -> ScoreResult:
    """"Generation" with a masked LM, the paper's RoBERTa HotpotQA protocol: the prompt followed by
    ``n_masks`` mask tokens (space-separated), one forward pass, the argmax token at every mask
    decoded as the answer text; then the metrics of :func:`score_generate` (exact_match, contains, f1).
    Right padding, so batched results equal batch size 1."""
    _check_batch_size(batch_size)
    mask_id, mask_token, pad_id = tokenizer.mask_token_id, tokenizer.mask_token, tokenizer.pad_token_id
    if mask_id is None or pad_id is None:
        raise ValueError("masked-LM generation needs a tokenizer with mask and pad tokens")
    rows = []
    for ex in examples:
        if ex.is_choice:
            raise ValueError(f"example {ex.id!r}: the masked_generate scorer scores answers, not choices")
        text = ex.prompt + "".join(f" {mask_token}" for _ in range(n_masks))
        rows.append(_encode(tokenizer, text, True))
    filled: dict[int, list[int]] = {}

    def read(batch, ids, logits):
        for b, r in enumerate(batch):
            where = (ids[b] == mask_id).nonzero().flatten().to(logits.device)
            filled[r] = logits[b, where].argmax(-1).tolist()

    _masked_batches(model, rows, read, pad_id=pad_id, batch_size=batch_size, forward_fn=forward_fn,
                    progress=progress, description=description)
    per_example = _generation_rows(tokenizer, examples, filled)
    return ScoreResult(per_example=per_example, metrics=_means(per_example))


#: Scorers that generate text (their metrics: exact_match, contains, f1); the others score at one position.
GENERATION_SCORERS = _metrics.GENERATION_SCORERS
GENERATION_METRICS = _metrics.GENERATION


def _means(per_example: list[dict]) -> dict[str, float]:
    metrics: dict[str, float] = {}
    for name in _MEAN_METRICS:
        vals = [float(r[name]) for r in per_example if name in r]
        if vals:
            metrics[name] = float(np.mean(vals))
    metrics["n"] = len(per_example)
    return metrics


__all__ = [
    "GENERATION_METRICS",
    "GENERATION_SCORERS",
    "ScoreResult",
    "article_token_ids",
    "score_examples",
    "score_generate",
    "score_masked_generate",
    "score_masked",
    "token_f1",
    "strip_leading_article",
]


def check_tokenisation(scorer: str, tokenizer, examples: Sequence[Example]) -> None:
    """What the scorer would refuse in ``examples``, found with the tokenizer alone (no weights, no forward):
    a prompt or answer that tokenises to nothing, a masked prompt without exactly one mask, choices a mask cannot
    tell apart, a tokenizer without the special tokens the scorer needs. Raises :class:`BenchmarkError` naming the
    example, so a data problem fails before the weights load instead of after them."""
    try:
        if scorer == "causal":
            _causal_rows(tokenizer, examples)
        elif scorer == "masked":
            if tokenizer.mask_token_id is None or tokenizer.pad_token_id is None:
                raise ValueError("masked-LM scoring needs a tokenizer with mask and pad tokens")
            _masked_rows(tokenizer, examples, tokenizer.mask_token_id, tokenizer.mask_token)
        elif scorer in ("generate", "masked_generate"):
            for ex in examples:
                if ex.is_choice:
                    raise ValueError(f"example {ex.id!r}: the {scorer} scorer scores answers, not choices")
                if scorer == "generate" and not _prompt_ids(tokenizer, ex.prompt):
                    raise ValueError(f"example {ex.id!r}: prompt tokenises to nothing and the tokenizer adds no BOS")
    except BenchmarkError:
        raise
    except ValueError as exc:
        raise BenchmarkError(str(exc)) from None
