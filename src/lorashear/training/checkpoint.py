"""Atomic, resumable checkpoints of an LHSPG run.

A checkpoint ``<root>/step-00000120/`` holds everything that changes during a run:

- ``params.safetensors``: the LoRA factors, every base weight a LoRA layer wraps
  (merges and progressive forgetting change them) and every parameter a
  candidate group names;
- ``lhspg.pt``: LHSPG period state (selected, redundant, committed groups) and the
  inner optimizer's state; ``scheduler.pt``: the learning-rate scheduler;
- ``rng_<rank>.pt``: torch (CPU and CUDA), Python and NumPy RNG states of each process;
- ``state.json``: the step, tokens seen, the data position and the run's settings.

Every process writes into ``.step-N.partial``; the main process renames it to
``step-N`` once all are done, so a directory named ``step-*`` is always complete.
Older checkpoints beyond ``keep`` are removed afterwards. Data order is a pure
function of (seed, step), so the step is the data position.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step-(\d+)$")


def mutable_parameter_names(model: torch.nn.Module, lhspg: Any) -> list[str]:
    """Names of the parameters a run can change (LoRA factors, wrapped base weights, group slices)."""
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    names |= set(lhspg.loras)
    names |= {s.name for g in lhspg.candidates for s in g.slices}
    return sorted(names)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(root: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = _STEP_DIR.match(child.name)
        if m and child.is_dir() and (child / "state.json").is_file():
            found.append((int(m.group(1)), child))
    return sorted(found)


def latest_checkpoint(root: str | os.PathLike[str]) -> Path | None:
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def save_checkpoint(root: str | os.PathLike[str], *, step: int, model: torch.nn.Module, lhspg: Any,
                    scheduler: Any, state: dict[str, Any], accelerator: Any = None, keep: int = 1) -> Path:
    """Write checkpoint ``step`` under ``root`` (call on every process)."""
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
    torch.save(rng_state(), partial / f"rng_{rank}.pt")
    if main:
        params = dict(model.named_parameters(remove_duplicate=False))
        tensors = {n: params[n].detach().to("cpu", copy=True).contiguous() for n in mutable_parameter_names(model, lhspg)}
        save_file(tensors, str(partial / "params.safetensors"))
        torch.save(lhspg.state_dict(), partial / "lhspg.pt")
        torch.save(scheduler.state_dict(), partial / "scheduler.pt")
        with open(partial / "state.json", "w", encoding="utf-8") as fh:
            json.dump({"step": step, **state}, fh, indent=2)
            fh.flush()
            os.fsync(fh.fileno())
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


def load_checkpoint(path: str | os.PathLike[str], *, model: torch.nn.Module, lhspg: Any, scheduler: Any,
                    accelerator: Any = None) -> dict[str, Any]:
    """Restore a checkpoint written by :func:`save_checkpoint`; returns its ``state.json``."""
    from safetensors.torch import load_file

    path = Path(path)
    rank = 0 if accelerator is None else accelerator.process_index
    params = dict(model.named_parameters(remove_duplicate=False))
    tensors = load_file(str(path / "params.safetensors"))
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value.to(params[name].device))
    lhspg.load_state_dict(torch.load(path / "lhspg.pt", weights_only=False))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    rng_file = path / f"rng_{rank}.pt"
    if not rng_file.is_file():
        rng_file = path / "rng_0.pt"
    set_rng_state(torch.load(rng_file, weights_only=False))
    return json.loads((path / "state.json").read_text())


def _barrier(accelerator: Any) -> None:
    if accelerator is not None and accelerator.num_processes > 1:
        accelerator.wait_for_everyone()
