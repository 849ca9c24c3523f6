"""Benchmark examples, seeded held-out splits, and shared loader helpers.

An :class:`Example` is one scored prompt. Generative examples carry the accepted ``answers`` and are
scored on the next token (top-k) and the teacher-forced log-prob of the answer; choice examples carry
``choices`` plus the index ``label`` of the correct one and are scored by comparing the log-prob of
each choice.

Splits are made over *groups* (``Example.group``, falling back to ``Example.id``) so that related
prompts (the three prompts of one CounterFact record) always land on the same side.
"""

from __future__ import annotations

from ..errors import InputError
import dataclasses
import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence


class BenchmarkError(InputError):
    """A benchmark could not be loaded: unknown name, missing/invalid file, bad record."""


@dataclass(frozen=True)
class Example:
    """One scored prompt.

    ``answers``: accepted answers (without the leading space; the scorer adds it). For choice
    examples ``answers`` holds the correct choice, ``choices`` all candidates and ``label`` the index
    of the correct one. ``group`` is the unit of splitting (``None`` → the example is its own group).
    ``masked_prompt``: the prompt for masked LMs, with ``{mask}`` where the mask token goes
    (``None`` → ``prompt + " {mask}"``).
    """

    id: str
    prompt: str
    answers: tuple[str, ...]
    choices: tuple[str, ...] | None = None
    label: int | None = None
    group: str | None = None
    masked_prompt: str | None = None

    #: placeholder for the tokenizer's mask token in :attr:`masked_prompt`
    MASK = "{mask}"

    @property
    def is_choice(self) -> bool:
        return self.choices is not None

    @property
    def split_group(self) -> str:
        return self.group if self.group is not None else self.id

    def masked_text(self, mask_token: str) -> str:
        """The masked-LM prompt: :attr:`masked_prompt` (the paper's RoBERTa wording where it differs)
        or ``prompt + " {mask}"``, with ``{mask}`` replaced by ``mask_token``."""
        template = self.masked_prompt if self.masked_prompt is not None else f"{self.prompt} {self.MASK}"
        return template.replace(self.MASK, mask_token)

    def to_json(self) -> dict:
        data = dataclasses.asdict(self)
        if data["masked_prompt"] is None:  # keeps the SHA-256 of examples without one unchanged
            del data["masked_prompt"]
        return data


def examples_sha256(examples: Iterable[Example]) -> str:
    """SHA-256 over the canonical JSON (sorted keys, compact, UTF-8) of the examples, in order."""
    payload = json.dumps(
        [ex.to_json() for ex in examples], sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


SPLIT_NAMES = ("validation", "test", "all")


@dataclass
class Split:
    """A validation/test partition produced by :func:`split_examples`."""

    validation: list[Example]
    test: list[Example]
    seed: int | None
    validation_fraction: float

    def get(self, split_name: str) -> list[Example]:
        if split_name not in SPLIT_NAMES:
            raise ValueError(f"unknown split {split_name!r}; expected one of {', '.join(SPLIT_NAMES)}")
        if split_name == "all":  # every example (file order when validation_fraction is 0)
            return self.validation + self.test
        return getattr(self, split_name)

    def info(self, split_name: str) -> dict:
        """Provenance of one side of the split, for reports and verification manifests."""
        chosen = self.get(split_name)
        return {
            "seed": self.seed,
            "validation_fraction": self.validation_fraction,
            "sizes": {"validation": len(self.validation), "test": len(self.test)},
            "examples_sha256": examples_sha256(chosen),
        }


def split_examples(
    examples: Sequence[Example], *, seed: int | None, validation_fraction: float
) -> Split:
    """Partition ``examples`` into validation and test by group.

    Groups are taken in order of first appearance. With an integer ``seed`` the list of groups is
    shuffled with ``random.Random(seed)``; with ``seed=None`` it is *not* shuffled — the paper's
    protocol, where the first ``validation_fraction`` of the data is validation and the rest test.
    The first ``round(validation_fraction * n_groups)`` groups go to validation, the rest to test.
    Within each side examples keep their original relative order. Deterministic for a given seed.
    """
    if not 0.0 <= validation_fraction <= 1.0:
        raise ValueError(f"validation_fraction must be in [0, 1], got {validation_fraction}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"seed must be an int or None, got {seed!r}")
    groups: list[str] = []
    seen: set[str] = set()
    for ex in examples:
        g = ex.split_group
        if g not in seen:
            seen.add(g)
            groups.append(g)
    order = list(groups)
    if seed is not None:
        random.Random(seed).shuffle(order)
    n_val = int(round(validation_fraction * len(order)))
    val_groups = set(order[:n_val])
    validation = [ex for ex in examples if ex.split_group in val_groups]
    test = [ex for ex in examples if ex.split_group not in val_groups]
    return Split(validation=validation, test=test, seed=seed, validation_fraction=validation_fraction)


def cache_dir() -> Path:
    """``~/.cache/laser-export`` (downloads and extracted benchmark files live here)."""
    return Path.home() / ".cache" / "laser-export"


def check_unique_ids(examples: Sequence[Example], source: str) -> None:
    seen: set[str] = set()
    for ex in examples:
        if ex.id in seen:
            raise BenchmarkError(f"{source}: duplicate example id {ex.id!r} (ids must be unique)")
        seen.add(ex.id)
