"""Atomic, resumable checkpoints of a training run, stored as safetensors and JSON only.

A checkpoint ``<root>/step-00000120/`` holds everything that changes during a run:

- ``params.safetensors``: the parameters the run can change (LoRA factors, the
  base weights that merges and progressive forgetting change);
- ``state.safetensors`` + ``state.json``: the state of every stateful part (the
  inner optimizer, the learning-rate scheduler, LHSPG's period state, step
  hooks), their tensors in the safetensors file and everything else as JSON;
  and the step, tokens seen and the run's settings;
- ``rng_<rank>.json``: torch (CPU and CUDA), Python and NumPy RNG states of each process.

No pickle is ever written or read. Every process writes into ``.step-N.partial``;
the main process renames it to ``step-N`` once all are done, so a directory named
``step-*`` is always complete. Older checkpoints beyond ``keep`` are removed
afterwards. Data order is a pure function of (seed, step), so the step is the data position.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CheckpointError, CorruptCheckpointError

logger = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step-(\d+)$")
_TENSOR = "__tensor__"
_TUPLE = "__tuple__"
_INTKEYS = "__intkeys__"


# -- a JSON + safetensors encoding of nested state dicts ---------------------------------------
def encode_tree(obj: Any, tensors: dict[str, torch.Tensor], prefix: str = "t") -> Any:
    """``obj`` as JSON, its tensors moved into ``tensors`` (keys referenced from the JSON)."""
    if isinstance(obj, torch.Tensor):
        key = f"{prefix}.{len(tensors)}"
        tensors[key] = obj.detach().to("cpu", copy=True).contiguous()
        return {_TENSOR: key}
    if isinstance(obj, np.ndarray):
        return encode_tree(torch.from_numpy(np.ascontiguousarray(obj)), tensors, prefix)
    if isinstance(obj, Mapping):
        keys = list(obj.keys())
        if keys and all(isinstance(k, int) for k in keys):
            return {_INTKEYS: [[k, encode_tree(obj[k], tensors, prefix)] for k in keys]}
        if not all(isinstance(k, str) for k in keys):
            raise TypeError(f"cannot encode mapping keys {keys[:3]!r}")
        return {k: encode_tree(v, tensors, prefix) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return {_TUPLE: [encode_tree(v, tensors, prefix) for v in obj]}
    if isinstance(obj, list):
        return [encode_tree(v, tensors, prefix) for v in obj]
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot encode {type(obj).__name__} in a checkpoint")


def decode_tree(obj: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {_TENSOR}:
            return tensors[obj[_TENSOR]]
        if set(obj) == {_TUPLE}:
            return tuple(decode_tree(v, tensors) for v in obj[_TUPLE])
        if set(obj) == {_INTKEYS}:
            return {int(k): decode_tree(v, tensors) for k, v in obj[_INTKEYS]}
        return {k: decode_tree(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [decode_tree(v, tensors) for v in obj]
    return obj


# -- RNG ---------------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    py = random.getstate()
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


# -- checkpoints -------------------------------------------------------------------------------
def list_checkpoints(root: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """``(step, directory)`` of every checkpoint under ``root``, oldest first.

    A ``step-N`` directory is complete when written (it is renamed into place); one that lost a
    file later is still listed, so that loading it reports what is wrong.
    """
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = _STEP_DIR.match(child.name)
        if m and child.is_dir():
            found.append((int(m.group(1)), child))
    return sorted(found)


def latest_checkpoint(root: str | os.PathLike[str]) -> Path | None:
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def _write_json(path: Path, data: Any) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())


def save_checkpoint(root: str | os.PathLike[str], *, step: int, model: torch.nn.Module, param_names: list[str],
                    stateful: Mapping[str, Any], state: dict[str, Any], accelerator: Any = None,
                    keep: int = 1) -> Path:
    """Write checkpoint ``step`` under ``root`` (call on every process).

    ``stateful`` maps a name to an object with ``state_dict()`` (optimizer, scheduler, LHSPG, hooks).
    """
    from safetensors.torch import save_file

    root = Path(root)
    main = accelerator is None or accelerator.is_main_process
    rank = 0 if accelerator is None else accelerator.process_index
    partial = root / f".step-{step:08d}.partial"
    final = root / f"step-{step:08d}"
    if main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
    _barrier(accelerator)
    _write_json(partial / f"rng_{rank}.json", rng_state())
    if main:
        params = dict(model.named_parameters(remove_duplicate=False))
        save_file({n: params[n].detach().to("cpu", copy=True).contiguous() for n in param_names},
                  str(partial / "params.safetensors"))
        tensors: dict[str, torch.Tensor] = {}
        parts = {name: encode_tree(obj.state_dict(), tensors, name) for name, obj in stateful.items()}
        save_file(tensors, str(partial / "state.safetensors"))
        _write_json(partial / "state.json", {"step": step, **state, "parts": parts})
    _barrier(accelerator)
    if main:
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        for _, old in list_checkpoints(root)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        logger.debug("checkpoint written: %s", final)
    _barrier(accelerator)
    return final


def load_checkpoint(path: str | os.PathLike[str], *, model: torch.nn.Module, stateful: Mapping[str, Any],
                    accelerator: Any = None) -> dict[str, Any]:
    """Restore a checkpoint written by :func:`save_checkpoint`; returns its ``state.json`` (without parts)."""
    from safetensors.torch import load_file

    path = Path(path)
    rank = 0 if accelerator is None else accelerator.process_index
    rng_name = f"rng_{rank}.json" if (path / f"rng_{rank}.json").is_file() else "rng_0.json"
    # read every file before changing anything: a corrupt checkpoint leaves the model as it was
    state = read_checkpoint_file(path, "state.json", _read_json)
    tensors = read_checkpoint_file(path, "params.safetensors", lambda f: load_file(str(f)))
    state_tensors = read_checkpoint_file(path, "state.safetensors", lambda f: load_file(str(f)))
    rng = read_checkpoint_file(path, rng_name, _read_json)
    if not isinstance(state, dict):
        raise CorruptCheckpointError(f"checkpoint file {path / 'state.json'} is corrupt (not a JSON object)")
    params = dict(model.named_parameters(remove_duplicate=False))
    missing = sorted(set(tensors) - set(params))
    if missing:
        raise CheckpointError(f"checkpoint {path} holds parameters this model lacks ({missing[0]}, ...); "
                              "it belongs to another run")
    with torch.no_grad():
        for name, value in tensors.items():
            if params[name].shape != value.shape:
                raise CheckpointError(f"checkpoint {path}: {name} has shape {tuple(value.shape)}, the model "
                                      f"{tuple(params[name].shape)}; it belongs to another run")
            params[name].copy_(value.to(params[name].device))
    parts = state.pop("parts", {})
    for name, obj in stateful.items():
        if name not in parts:
            raise CheckpointError(f"checkpoint {path} has no state for {name!r}; it belongs to another run")
        obj.load_state_dict(decode_tree(parts[name], state_tensors))
    set_rng_state(rng)
    return state


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def read_checkpoint_file(checkpoint: str | os.PathLike[str], name: str, reader: Any) -> Any:
    """``reader(checkpoint / name)``; a missing or unreadable file raises a one-line
    :class:`~lorashear.errors.CorruptCheckpointError` naming it."""
    from safetensors import SafetensorError

    file = Path(checkpoint) / name
    if not file.is_file():
        raise CorruptCheckpointError(f"checkpoint {checkpoint} is incomplete: {name} is missing")
    try:
        return reader(file)
    except (OSError, ValueError, SafetensorError, UnicodeDecodeError) as exc:
        text = str(exc).strip()
        reason = text.splitlines()[0][:200] if text else type(exc).__name__
        raise CorruptCheckpointError(f"checkpoint file {file} is corrupt or truncated ({reason})") from exc


def _barrier(accelerator: Any) -> None:
    if accelerator is not None and accelerator.num_processes > 1:
        accelerator.wait_for_everyone()
