"""``laser-export scan``: a data-free spectrum scan of every chosen (layer, matrix), without loading the model.

Each matrix is read on its own — shard by shard from a safetensors checkpoint (one shard open at a time,
memory mapped), or tensor by tensor from a GGUF file (de-quantized with the ``gguf`` package) — and its
singular values are computed exactly in float64 (:func:`laser_export.lowrank.singular_values`). Per matrix
the scan records the top singular values, the Marchenko–Pastur noise edge and noise level (the estimate
``rank: auto`` and the search's SNR use), the SNR, the auto rank, and the Frobenius energy a rank-⌊ρ·max⌋
reduction keeps at each ρ. The JSON is what ``search --from-scan`` reads to order or prune candidates;
the PNG is a heatmap of SNR by layer × matrix.

Module names come from the model built on the ``meta`` device (no weights), so the architecture tables
and Conv1D layouts are handled exactly as the in-memory path handles them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from .errors import InputError
from .lowrank import auto_rank, rank_for, singular_values
from .options import layers_syntax, no_progress, non_empty, option, validate

#: the ρ at which the kept Frobenius energy is reported (the search's default grid)
SCAN_RHOS = (0.01, 0.05, 0.1, 0.25, 0.5)
#: how many of the largest singular values each entry keeps
TOP_K = 16


class ScanError(InputError):
    """A scan input problem: a matrix the checkpoint does not hold, an unreadable scan file."""


@dataclass
class ScanOptions:
    """Options of ``laser-export scan`` (its flags are generated from the fields that carry one)."""

    source: str = option(help="model source: safetensors folder, Hub id[@revision] or .gguf file", positional=True,
                         check=non_empty)
    out: str = option(help="scan JSON to write (the heatmap is <out stem>.png)", check=non_empty, metavar="SCAN_JSON")
    layers: str | None = option(None, "e.g. 20-29 or 24,26,28 (default: every layer)", check=layers_syntax)
    matrices: str = option("mlp,attn", "aliases or groups, comma separated", check=non_empty)
    revision: str | None = option(None, "Hub revision of the source")
    rhos: tuple[float, ...] = SCAN_RHOS  # where the kept Frobenius energy is reported
    trust_remote_code: bool = False
    plot: bool = True
    progress: bool = no_progress()

    def __post_init__(self) -> None:
        validate(self)


@dataclass
class _Site:
    layer: int
    alias: str
    module: str
    conv: bool = False
    key: str | None = None  # tensor name in the checkpoint
    extra: dict = field(default_factory=dict)


def spectrum_entry(S: torch.Tensor, shape: tuple[int, int], rhos=SCAN_RHOS) -> dict:
    """The spectrum summary of one matrix from all its singular values (descending)."""
    from .search.snr import snr

    S = S.double()
    found = auto_rank(S, shape)
    energy = S.pow(2)
    total = float(energy.sum())
    cum = energy.cumsum(0)
    kept = {f"{rho:g}": float(cum[rank_for(rho, shape) - 1]) / total if total > 0 else 1.0 for rho in rhos}
    s = snr(S, shape)
    return {
        "shape": [int(shape[0]), int(shape[1])],
        "top_singular_values": [float(x) for x in S[:TOP_K]],
        "sigma_max": float(S[0]),
        "frobenius_norm": math.sqrt(total),
        "mp_edge": found.edge,
        "noise_std": found.noise_std,
        "snr": s["snr"],
        "n_signal": s["n_signal"],
        "auto_rank": found.rank,
        "max_rank": min(int(shape[0]), int(shape[1])),
        "energy_kept": kept,
    }


def _sites(opts: ScanOptions, source, config, family) -> list[_Site]:
    from .architectures import module_name, num_layers
    from .lowrank import is_conv1d
    from .search.grid import parse_layers, parse_matrices
    from .stream import meta_model

    n = num_layers(config)
    layers = parse_layers(opts.layers if opts.layers else f"0-{n - 1}", n)
    aliases = parse_matrices(opts.matrices, family)
    model = meta_model(config, family, trust_remote_code=opts.trust_remote_code)
    sites = []
    for layer in layers:
        for alias in aliases:
            name = module_name(model, family, layer, alias)
            sites.append(_Site(layer, alias, name, conv=is_conv1d(model.get_submodule(name))))
    return sites


def _safetensors_matrices(source, sites: list[_Site], base_prefix: str) -> Iterator[tuple[_Site, torch.Tensor]]:
    """(site, (out, in) matrix) in checkpoint order, one shard open at a time."""
    from .stream import _Reader, checkpoint_folder, list_tensors

    by_key = {t.key: t for t in list_tensors(checkpoint_folder(source))}
    missing = []
    for s in sites:
        key = f"{s.module}.weight"
        if key not in by_key and base_prefix and key.startswith(base_prefix + "."):
            key = key[len(base_prefix) + 1 :]
        if key not in by_key:
            missing.append(key)
        s.key = key
    if missing:
        raise ScanError(f"model.source: {source.describe()} has no tensor {', '.join(missing[:3])}")
    order = {k: i for i, k in enumerate(by_key)}
    reader = _Reader()
    try:
        for s in sorted(sites, key=lambda s: order[s.key]):
            w = reader.get(by_key[s.key])
            yield s, (w.t() if s.conv else w)
    finally:
        reader.close()


def _gguf_matrices(source, sites: list[_Site], family, config) -> Iterator[tuple[_Site, torch.Tensor]]:
    """(site, (out, in) matrix) de-quantized tensor by tensor from a GGUF file. Rows of q/k are permuted in
    GGUF files (llama.cpp's rotary layout); a row permutation leaves the singular values unchanged."""
    import gguf

    from .architectures import num_layers

    path = Path(source.location) / source.gguf_file
    if not family.gguf_arch:
        raise ScanError(f"model.source: {family.name} has no GGUF architecture in its family table")
    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == family.gguf_arch)
    names = gguf.get_tensor_name_map(arch_id, num_layers(config))
    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: t for t in reader.tensors}
    for s in sites:
        s.key = names.get_name(f"{s.module}.weight", try_suffixes=(".weight",))
        if s.key not in tensors:
            raise ScanError(f"model.source: {path} has no GGUF tensor for {s.module} ({s.key})")
    order = {k: i for i, k in enumerate(tensors)}
    for s in sorted(sites, key=lambda s: order[s.key]):
        t = tensors[s.key]
        yield s, torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())


def scan(opts: ScanOptions, on_matrix: Callable[[dict], None] | None = None) -> dict:
    """Scan ``opts.source``; returns (and writes to ``opts.out``) {source, model_type, rhos, matrices: [...]}."""
    from .atomic import clean_part_debris, write_json
    from .progress import bar
    from .sources import check_config, family_of, resolve_source
    from .stream import meta_model  # noqa: F401 - fail early if accelerate is missing

    check_outputs(opts)
    source = resolve_source(opts.source, opts.revision)
    source.check_files()
    config = source.load_config(trust_remote_code=opts.trust_remote_code)
    check_config(config, source.describe())
    family = family_of(config)
    sites = _sites(opts, source, config, family)
    if source.gguf_file:
        matrices = _gguf_matrices(source, sites, family, config)
    else:
        prefix = _base_prefix(config, family, opts.trust_remote_code)
        matrices = _safetensors_matrices(source, sites, prefix)
    rows = []
    with bar("scan", enabled=opts.progress, unit="matrices") as progress:
        task = progress.add_task("", total=len(sites))
        for s, w in matrices:
            shape = (int(w.shape[0]), int(w.shape[1]))
            entry = {"layer": s.layer, "matrix": s.alias, "module": s.module, "tensor": s.key,
                     **spectrum_entry(singular_values(w), shape, opts.rhos)}
            del w
            rows.append(entry)
            if on_matrix:
                on_matrix(entry)
            progress.update(task, description=f"L{s.layer}.{s.alias} snr {entry['snr']:.3g} auto rank {entry['auto_rank']}")
            progress.advance(task)
    rows.sort(key=lambda r: (r["layer"], [x.alias for x in sites].index(r["matrix"])))
    result = {"scan_version": 1, "source": source.spec or opts.source, "describe": source.describe(),
              "model_type": config.model_type, "rhos": list(opts.rhos), "matrices": rows}
    out = Path(opts.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_part_debris(out.parent)  # .part files of killed scan writes
    write_json(out, result, indent=1)
    if opts.plot:
        result["plot"] = str(plot_scan(result, out.with_suffix(".png")))
    return result


def check_outputs(opts: ScanOptions) -> None:
    """The output policy for the scan JSON and its heatmap, before anything is read: never the source (a
    local folder or file) or a file inside it, never a folder or a FIFO. Raises OutputError (exit 2)."""
    from .policy import OutputError, check_file_output

    local = Path(opts.source).expanduser()
    held = [local] if local.exists() else []
    check_file_output(opts.out, "--out", protect=held)
    if opts.plot:
        png = Path(opts.out).with_suffix(".png")
        if png == Path(opts.out):
            raise OutputError(f"--out {opts.out}: the heatmap goes to <out stem>.png, which would replace the scan "
                              f"JSON; name the JSON otherwise (e.g. {png.with_suffix('.json')})")
        check_file_output(png, f"--out ({png.name})", protect=held)


def _base_prefix(config, family, trust_remote_code: bool) -> str:
    from .stream import meta_model

    return getattr(meta_model(config, family, trust_remote_code=trust_remote_code), "base_model_prefix", "")


def plot_scan(result: dict, path: Path) -> Path:
    """Heatmap of SNR (log10) by layer × matrix, the auto rank written in each cell."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from .atomic import open_atomic

    rows = result["matrices"]
    layers = sorted({r["layer"] for r in rows})
    mats = list(dict.fromkeys(r["matrix"] for r in rows))
    grid = np.full((len(layers), len(mats)), np.nan)
    ranks = {}
    for r in rows:
        i, j = layers.index(r["layer"]), mats.index(r["matrix"])
        grid[i, j] = math.log10(r["snr"]) if 0 < r["snr"] < math.inf else np.nan
        ranks[(i, j)] = r["auto_rank"]
    fig, ax = plt.subplots(figsize=(1.2 * len(mats) + 2.5, 0.28 * len(layers) + 2.0))
    try:
        cmap = matplotlib.colormaps["viridis"].with_extremes(bad="lightgrey")  # SNR 0: nothing above the edge
        im = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", origin="lower", cmap=cmap)
        ax.set_xticks(range(len(mats)), mats, fontsize=9)
        ax.set_yticks(range(len(layers)), [str(x) for x in layers], fontsize=7 if len(layers) > 24 else 9)
        ax.set_xlabel("matrix")
        ax.set_ylabel("layer")
        for (i, j), k in ranks.items():
            ax.text(j, i, str(k), ha="center", va="center", fontsize=6 if len(layers) > 24 else 8,
                    color="black" if np.isnan(grid[i, j]) else "white")
        ax.set_title(f"spectrum scan: {Path(str(result['source'])).name or result['source']}\n"
                     "colour: log10 SNR above the MP edge (grey: none above it); number: auto rank", fontsize=10)
        fig.colorbar(im, ax=ax, label="log10 SNR")
        fig.tight_layout()
        with open_atomic(path, "wb") as f:
            fig.savefig(f, dpi=120, format="png")
    finally:
        plt.close(fig)
    return path


def load_scan(path: str | Path) -> dict:
    """A scan JSON written by :func:`scan`; ScanError naming the file when it is not one."""
    import json

    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise ScanError(f"--from-scan: cannot read {path}: {err}") from None
    if not isinstance(data, dict) or not isinstance(data.get("matrices"), list):
        raise ScanError(f"--from-scan: {path} is not a laser-export scan (no 'matrices' list)")
    return data
