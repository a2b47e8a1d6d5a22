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
    """Restore a checkpoint written by :func:`save_checkpoint`; returns its ``state.json`` (without parts).

    Every file is read and its content checked before anything changes (:func:`read_state`,
    :func:`check_rng_state`): a file that is valid JSON with the wrong content is as corrupt as a
    truncated one (:class:`~lorashear.errors.CorruptCheckpointError`, so an earlier checkpoint can be
    tried), and a corrupt checkpoint leaves the model as it was."""
    from safetensors.torch import load_file

    path = Path(path)
    rank = 0 if accelerator is None else accelerator.process_index
    rng_name = f"rng_{rank}.json" if (path / f"rng_{rank}.json").is_file() else "rng_0.json"
    state = read_state(path, parts=list(stateful))
    tensors = read_checkpoint_file(path, "params.safetensors", lambda f: load_file(str(f)))
    state_tensors = read_checkpoint_file(path, "state.safetensors", lambda f: load_file(str(f)))
    rng = read_checkpoint_file(path, rng_name, _read_json)
    check_rng_state(rng, path / rng_name)
    parts = state.pop("parts")
    decoded = {name: _decode_part(parts[name], state_tensors, path, name) for name in stateful}
    for name, obj in stateful.items():  # a part that changed the model's shapes (compaction) replays that first
        if hasattr(obj, "before_load"):
            try:
                obj.before_load(decoded[name])
            except (KeyError, ValueError, TypeError, IndexError) as exc:
                raise CorruptCheckpointError(f"checkpoint file {path / 'state.json'} is corrupt (the state of "
                                             f"{name!r} does not restore: {_first_line(exc)})") from exc
    params = dict(model.named_parameters(remove_duplicate=False))
    missing = sorted(set(tensors) - set(params))
    if missing:
        raise CheckpointError(f"checkpoint {path} holds parameters this model lacks ({missing[0]}, ...); "
                              "it belongs to another run")
    for name, value in tensors.items():
        if params[name].shape != value.shape:
            raise CheckpointError(f"checkpoint {path}: {name} has shape {tuple(value.shape)}, the model "
                                  f"{tuple(params[name].shape)}; it belongs to another run")
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value.to(params[name].device))
    for name, obj in stateful.items():
        try:
            obj.load_state_dict(decoded[name])
        except (KeyError, ValueError, TypeError, IndexError, RuntimeError, AttributeError) as exc:
            raise CorruptCheckpointError(f"checkpoint file {path / 'state.json'} is corrupt (the state of {name!r} "
                                         f"does not restore: {_first_line(exc)})") from exc
    set_rng_state(rng)
    return state


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0][:160] if text else type(exc).__name__)


def _decode_part(part: Any, tensors: Mapping[str, torch.Tensor], path: Path, name: str) -> Any:
    try:
        return decode_tree(part, tensors)
    except (KeyError, TypeError, ValueError) as exc:
        raise CorruptCheckpointError(f"checkpoint file {path / 'state.json'} is corrupt (the state of {name!r} "
                                     f"refers to tensors state.safetensors lacks)") from exc


def read_state(path: str | os.PathLike[str], *, parts: list[str] | None = None) -> dict[str, Any]:
    """``state.json`` of a checkpoint, checked: a JSON object with a whole ``step`` >= 0 and, when ``parts``
    names the stateful objects, a ``parts`` object holding each of them. Anything else is a
    :class:`~lorashear.errors.CorruptCheckpointError` naming the file."""
    path = Path(path)
    state = read_checkpoint_file(path, "state.json", _read_json)
    file = path / "state.json"
    problem = None
    if not isinstance(state, dict):
        problem = "not a JSON object"
    elif not isinstance(state.get("step"), int) or isinstance(state["step"], bool) or state["step"] < 0:
        problem = "no step"
    elif parts is not None and not isinstance(state.get("parts"), dict):
        problem = "no parts"
    elif parts is not None:
        absent = [n for n in parts if not isinstance(state["parts"].get(n), (dict, list))]
        problem = f"no state for {absent[0]!r}" if absent else None
    if problem is not None:
        raise CorruptCheckpointError(f"checkpoint file {file} is corrupt ({problem})")
    return state


def _is_int_list(value: Any, length: int | None = None, low: int | None = None, high: int | None = None) -> bool:
    if not isinstance(value, list) or (length is not None and len(value) != length):
        return False
    return all(isinstance(v, int) and not isinstance(v, bool) and (low is None or v >= low)
               and (high is None or v <= high) for v in value)


def check_rng_state(state: Any, file: Path) -> None:
    """Refuse an RNG state :func:`set_rng_state` could not restore exactly (wrong keys, types or lengths)."""
    ok = isinstance(state, dict)
    if ok:
        py, np_state, cpu = state.get("python"), state.get("numpy"), state.get("torch")
        ok = (isinstance(py, list) and len(py) == 3 and isinstance(py[0], int) and _is_int_list(py[1], 625, 0)
              and (py[2] is None or isinstance(py[2], (int, float)))
              and isinstance(np_state, list) and len(np_state) == 5 and isinstance(np_state[0], str)
              and _is_int_list(np_state[1], 624, 0) and all(isinstance(v, (int, float)) for v in np_state[2:])
              and _is_int_list(cpu, torch.get_rng_state().numel(), 0, 255)
              and isinstance(state.get("cuda", []), list)
              and all(_is_int_list(s, None, 0, 255) for s in state.get("cuda", [])))
    if not ok:
        raise CorruptCheckpointError(f"checkpoint file {file} is corrupt (not the RNG state of a run)")


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
