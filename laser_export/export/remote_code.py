"""Ship the loading code with a factorised export (``auto_map`` + ``modeling_laser.py``).

With these two additions, ``Auto<Class>.from_pretrained(folder_or_repo, trust_remote_code=True)`` loads the
factorised checkpoint with plain transformers: laser-export need not be installed. With laser-export
imported, the same folder still loads without ``trust_remote_code`` (the registered quantizer, see
:mod:`laser_export.hf`). The shipped file is ``laser_export/remote/modeling_laser.py`` plus one generated
class per checkpoint: ``Laser<ModelClass>(LaserLoadMixin, <ModelClass>)``.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from torch import nn

from ..architectures import family_for
from ..atomic import write_json, write_text

MODELING_FILE = "modeling_laser.py"


def modeling_source(model_class: str, config_class: str) -> str:
    """The modeling file's text with the generated classes for ``model_class`` and its ``config_class``.

    The config subclass is named in ``auto_map["AutoConfig"]``: loading the config with
    ``trust_remote_code=True`` imports this file, which registers the ``laser`` quantization method before
    anything reads ``quantization_config`` (lm-eval's HFLM does so before it loads the model class)."""
    for name in (model_class, config_class):
        if not name.isidentifier():
            raise ValueError(f"not a class name: {name!r}")
    base = resources.files("laser_export.remote").joinpath(MODELING_FILE).read_text()
    return base + (
        f"from transformers import {config_class}, {model_class}  # noqa: E402\n\n\n"
        f"class Laser{config_class}({config_class}):\n"
        f'    """{config_class}; loading it registers the laser quantization method (above)."""\n\n\n'
        f"class Laser{model_class}(LaserLoadMixin, {model_class}):\n"
        f'    """{model_class} whose factorised layers load from this checkpoint."""\n\n'
        f"    config_class = Laser{config_class}\n"
    )


def write_remote_code(folder: Path, model: nn.Module) -> dict[str, str]:
    """Write ``modeling_laser.py`` into ``folder`` and add ``auto_map`` to its ``config.json``.

    The Auto class comes from the family's ``auto_class``; ``AutoConfig`` maps to the generated config
    subclass. Returns the auto_map written."""
    folder = Path(folder)
    model_class, config_class = type(model).__name__, type(model.config).__name__
    auto_class = family_for(model.config.model_type).auto_class
    write_text(folder / MODELING_FILE, modeling_source(model_class, config_class))
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    stem = Path(MODELING_FILE).stem
    auto_map = {"AutoConfig": f"{stem}.Laser{config_class}", auto_class: f"{stem}.Laser{model_class}"}
    config["auto_map"] = {**config.get("auto_map", {}), **auto_map}
    write_json(config_path, config, sort_keys=True)
    return auto_map
