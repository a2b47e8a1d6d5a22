"""Save (pruned) models in Hugging Face format: safetensors, ``config.json`` and the tokenizer.

Uniform models reload with plain ``AutoModelForCausalLM.from_pretrained``; models
whose layers differ carry ``per_layer_config`` and reload with
:func:`lorashear.models.loading.load_pretrained`. Transformers parses that schema but its
families do not build layers from it (plain loading stops with a size mismatch), so such a
directory also gets our modelling file (:data:`REMOTE_CODE_FILE`, torch + transformers only)
and an ``auto_map`` in ``config.json``: ``AutoModelForCausalLM.from_pretrained(DIR,
trust_remote_code=True)`` then loads it without lorashear. Where the installed transformers
builds the per-layer shapes itself, nothing is added.
"""

from __future__ import annotations

import json
import logging
import os
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..atomic import atomic_directory
from ..errors import ConfigError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

#: the modelling file written next to a model whose layers differ (``resources/modeling/``, copied verbatim)
REMOTE_CODE_FILE = "modeling_lorashear.py"
#: model_type -> the class-name stem of its classes in :data:`REMOTE_CODE_FILE`
#: (``Lorashear<Stem>Config``, ``Lorashear<Stem>ForCausalLM``)
REMOTE_CODE_FAMILIES: dict[str, str] = {
    "llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3",
    "gemma": "Gemma", "gemma2": "Gemma2", "phi3": "Phi3", "olmo2": "Olmo2",
}


def remote_code_source() -> str:
    """The text of :data:`REMOTE_CODE_FILE` as shipped in the package."""
    return (resources.files("lorashear") / "resources" / "modeling" / REMOTE_CODE_FILE).read_text(encoding="utf-8")


def remote_code_auto_map(model_type: str) -> dict[str, str] | None:
    """The ``auto_map`` that points transformers at our classes for ``model_type`` (``None``: not covered)."""
    stem = REMOTE_CODE_FAMILIES.get(model_type)
    if stem is None:
        return None
    module = REMOTE_CODE_FILE.removesuffix(".py")
    return {"AutoConfig": f"{module}.Lorashear{stem}Config",
            "AutoModelForCausalLM": f"{module}.Lorashear{stem}ForCausalLM"}


def plain_loading_builds(directory: str | os.PathLike[str]) -> bool:
    """Whether plain transformers (no remote code) builds every tensor of ``directory`` with its stored
    shape: the model ``config.json`` describes is built on ``meta`` and compared with the safetensors
    headers. ``False`` when the build fails."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from .loading import safetensors_shapes

    directory = Path(directory)
    stored = safetensors_shapes(directory)
    try:
        config = AutoConfig.from_pretrained(directory, trust_remote_code=False)
        with init_empty_weights(include_buffers=False):
            plain = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 - any failure means plain loading does not work
        logger.debug("plain transformers cannot build %s: %s", directory, exc)
        return False
    built = {name: tuple(t.shape) for name, t in plain.state_dict().items()}
    return all(built.get(name) == shape for name, shape in stored.items())


def _write_config(path: Path, config: dict[str, Any]) -> None:
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_remote_code(directory: str | os.PathLike[str]) -> bool:
    """Make a saved model directory loadable by plain transformers when its layers differ.

    When ``config.json`` carries a ``per_layer_config`` that the installed transformers does not build
    itself (:func:`plain_loading_builds`) and the family is covered (:data:`REMOTE_CODE_FAMILIES`),
    :data:`REMOTE_CODE_FILE` is copied in and ``auto_map`` added; otherwise (a uniform model, or plain
    loading works) any ``auto_map`` and file of ours are removed, so the directory stays plain.
    Returns whether the directory now carries the remote code. Without ``trust_remote_code=True``
    plain transformers still refuses such a directory (a size mismatch), never loads it wrong.
    """
    directory = Path(directory)
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    model_type = str(config.get("model_type") or "")
    auto_map = remote_code_auto_map(model_type)
    needed = bool(config.get("per_layer_config")) and not plain_loading_builds(directory)
    if needed and auto_map is None:
        logger.warning("%s: layers of different widths and no modelling file for model type '%s'; "
                       "load it with lorashear.load_pretrained", directory, model_type)
    if needed and auto_map is not None:
        (directory / REMOTE_CODE_FILE).write_text(remote_code_source(), encoding="utf-8")
        config["auto_map"] = auto_map
        _write_config(config_path, config)
        return True
    ours = REMOTE_CODE_FILE.removesuffix(".py") + "."
    current = config.get("auto_map")
    if isinstance(current, dict) and current and all(str(v).startswith(ours) for v in current.values()):
        del config["auto_map"]
        _write_config(config_path, config)
    if (directory / REMOTE_CODE_FILE).is_file() and "auto_map" not in config:
        (directory / REMOTE_CODE_FILE).unlink()
    return False


def write_pretrained(model: "torch.nn.Module", directory: str | os.PathLike[str],
                     tokenizer: "PreTrainedTokenizerBase | None" = None) -> Path:
    """Write ``model`` (safetensors + config.json) and ``tokenizer`` into the existing ``directory``
    (not atomic: a stage calls it inside its own :func:`~lorashear.atomic.atomic_directory`).

    A peft-wrapped model is merged first (``merge_and_unload``). A model whose layers differ also
    gets our modelling file and ``auto_map`` (:func:`write_remote_code`).
    """
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    directory = Path(directory)
    model.save_pretrained(directory, safe_serialization=True)
    write_remote_code(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return directory


def save_pretrained(model: "torch.nn.Module", path: str | os.PathLike[str],
                    tokenizer: "PreTrainedTokenizerBase | None" = None) -> Path:
    """Write ``model`` (safetensors + config.json) and ``tokenizer`` to ``path`` atomically.

    A peft-wrapped model is merged first (``merge_and_unload``) so the directory
    holds a plain transformers model; one whose layers differ also carries our modelling file
    (``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`` loads it without
    lorashear; :func:`write_remote_code`). An existing directory is replaced as a whole (no file of
    an earlier model survives beside the new one); an existing regular file is refused.
    """
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{path} is a file; save_pretrained writes a directory, choose another path")
    with atomic_directory(path) as tmp:
        write_pretrained(model, tmp, tokenizer)
    return path
