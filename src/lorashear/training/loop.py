"""One training loop on accelerate for every stage: CPU, one GPU and multi-GPU alike.

:func:`train` runs ``config.steps`` optimizer steps of a model whose trainable
parameters are its LoRA factors. What changes between stages plugs in:

- a **loss** ``loss_fn(model, batch) -> scalar`` (:mod:`lorashear.training.losses`:
  next-token cross-entropy today; distillation plugs in the same way);
- **step hooks** (:class:`StepHook`): called before each micro-batch and after each
  optimizer step. LHSPG's update of the frozen base weights is one hook
  (:class:`LHSPGHook`); collecting activation statistics is another. A hook with
  ``state_dict``/``load_state_dict`` is checkpointed with the run.

Run it as a library call or under ``accelerate launch`` (DDP: every process holds
the whole model, gradients of the LoRA factors are all-reduced, the LHSPG update
is computed identically on every rank and group selection is broadcast from
rank 0). FSDP: the LHSPG update gathers rows of full base weights, so it needs
unsharded parameters; DDP is the tested multi-GPU path.

Data: a ``LongTensor[N, seq_len]`` of packed sequences (``lorashear.data.pack_texts``).
Micro-batch ``i`` of the run is a pure function of ``(seed, i)`` — a fresh seeded
permutation per epoch, each process taking its own slice — so the step number is
the data position and resuming needs no sampler state; a resumed run is
bit-identical on CPU.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from ..errors import CheckpointError, ConfigError, CorruptCheckpointError
from ..progress import progress_disabled
from .checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from .hooks import StepHook
from .losses import LossFn, lm_loss
from .optim import lora_parameters, make_optimizer

logger = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Settings of the LoRA training loop (pruning and fine-tuning alike)."""

    steps: int = field(default=200, metadata={"help": "optimizer steps in total (warm-up + periods + fine-tuning)"})
    batch_size: int = field(default=4, metadata={"help": "sequences per micro-batch per process"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    lr: float = field(default=2e-4, metadata={"help": "learning rate of the LoRA factors"})
    weight_decay: float = field(default=0.0, metadata={"help": "weight decay of the LoRA factors"})
    optimizer: Literal["adamw", "sgd"] = field(default="adamw", metadata={"help": "inner optimizer"})
    lr_scheduler: Literal["constant", "linear", "cosine"] = field(default="constant", metadata={
        "help": "learning-rate schedule after its warm-up"})
    lr_warmup_steps: int = field(default=0, metadata={"help": "linear learning-rate warm-up steps"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm (0 = off)"})
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = field(default="auto", metadata={
        "help": "autocast precision; auto = bf16 on a GPU that has it, else no"})
    grad_checkpointing: bool = field(default=False, metadata={"help": "recompute activations in backward"})
    checkpoint_every: int = field(default=0, metadata={"help": "write a resumable checkpoint every N steps (0 = off)"})
    keep_checkpoints: int = field(default=1, metadata={"help": "checkpoints kept on disk"})
    log_every: int = field(default=1, metadata={"help": "record loss and sparsity every N steps"})
    seed: int = field(default=0, metadata={"help": "seed of LoRA init, dropout, packing and data order"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr_warmup_steps", "checkpoint_every", "keep_checkpoints"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"lr must be a positive number, got {self.lr}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.max_grad_norm < 0:
            raise ConfigError(f"max_grad_norm must be >= 0, got {self.max_grad_norm}")


@dataclass
class TrainResult:
    log: list[dict[str, Any]]
    steps_done: int
    tokens_seen: int
    wall_time_s: float
    resumed_from: int | None
    stopped_early: bool

    @property
    def losses(self) -> list[float]:
        return [float(r["loss"]) for r in self.log]


def resolve_mixed_precision(value: str) -> str:
    if value != "auto":
        return value
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


def make_accelerator(mixed_precision: str = "auto") -> Any:
    """An ``accelerate.Accelerator`` for this machine.

    Without CUDA it is created with ``cpu=True`` so that ``accelerate launch --multi_gpu
    --num_processes N`` (torchrun underneath) forms an N-process gloo group on CPU
    (accelerate only does so when told the run is on CPU).
    """
    from accelerate import Accelerator

    return Accelerator(mixed_precision=resolve_mixed_precision(mixed_precision), cpu=not torch.cuda.is_available())


def lr_lambda(step: int, *, warmup: int, total: int, kind: str) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


@functools.lru_cache(maxsize=4)
def _epoch_permutation(num: int, seed: int, epoch: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num, generator=gen)


def batch_indices(num_sequences: int, micro_index: int, batch_size: int, *, seed: int, rank: int = 0,
                  world: int = 1) -> list[int]:
    """Sequence indices of micro-batch ``micro_index`` for process ``rank`` of ``world``."""
    start = micro_index * batch_size * world + rank * batch_size
    out = []
    for pos in range(start, start + batch_size):
        epoch, offset = divmod(pos, num_sequences)
        out.append(int(_epoch_permutation(num_sequences, seed, epoch)[offset]))
    return out


def check_data(data: torch.Tensor) -> None:
    if data.dim() != 2 or data.shape[0] == 0:
        raise ConfigError(f"training data must be a non-empty (N, seq_len) tensor, got shape {tuple(data.shape)}")


def train(
    model: torch.nn.Module,
    data: torch.Tensor,
    *,
    config: TrainConfig | None = None,
    loss_fn: LossFn = lm_loss,
    hooks: Sequence[StepHook] = (),
    make_hooks: Callable[[torch.nn.Module, Any], Sequence[StepHook]] | None = None,
    accelerator: Any = None,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    resume: bool = False,
    stop_after: int | None = None,
    desc: str = "train",
    run_settings: dict[str, Any] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    start_step: int = 0,
    end_step: int | None = None,
    extra_params: Iterable[str] = (),
    extra_state: dict[str, Any] | None = None,
    data_start: int = 0,
) -> TrainResult:
    """Train the LoRA factors of ``model`` (its only trainable parameters) on ``data``.

    Args:
        model: a peft LoRA model.
        data: packed token ids ``(N, seq_len)``.
        loss_fn: ``loss_fn(model, batch) -> loss`` (default: next-token cross-entropy).
        hooks: step hooks (see :class:`StepHook`).
        make_hooks: ``make_hooks(unwrapped_model, prepared_optimizer)`` builds hooks that need the
            optimizer the loop creates (LHSPG); called once before the first step.
        checkpoint_dir: where checkpoints go (needed for ``checkpoint_every`` and ``resume``).
        resume: continue from the latest checkpoint in ``checkpoint_dir`` if there is one.
        stop_after: stop after this many steps in total (a deliberate interruption; tests use it).
        run_settings: what defines the run (model, data, budget, method settings); stored in every
            checkpoint, and a resume from a checkpoint with other settings is refused.
        optimizer: an optimizer over exactly the trainable parameters to continue with (its moments
            carry over from an earlier call); default: a new one from ``config``.
        start_step: the step a fresh (not resumed) call starts at: the data position and the learning-rate
            schedule continue from there (a run trained in segments, e.g. before and after compaction).
        end_step: stop after this step (default ``config.steps``); the schedule still spans ``config.steps``.
        extra_params: more parameters to checkpoint (e.g. base weights an earlier segment changed).
        extra_state: JSON-able facts stored in every checkpoint's ``state.json`` (read back by the caller).
        data_start: the step at which ``data`` starts being read: step ``k`` reads micro-batch ``k - data_start``
            (a segment that trains on data of its own reads it from its first sequence on).
    """
    from accelerate.utils import set_seed

    cfg = config or TrainConfig()
    check_data(data)
    if accelerator is None:
        accelerator = make_accelerator(cfg.mixed_precision)
    set_seed(cfg.seed)
    if cfg.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "config"):
            model.config.use_cache = False
    params = lora_parameters(model)
    if not params:
        raise ConfigError("the model has no trainable (LoRA) parameters")
    if optimizer is not None:
        given = {id(p) for group in optimizer.param_groups for p in group["params"]}
        if given != {id(p) for p in params}:
            raise ConfigError("the optimizer given to train() must hold exactly the model's trainable parameters")
    inner = optimizer if optimizer is not None else make_optimizer(params, cfg.optimizer, cfg.lr, cfg.weight_decay)
    for group in inner.param_groups:  # a continued optimizer keeps its schedule's base rate
        group.setdefault("initial_lr", group["lr"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(inner, functools.partial(
        lr_lambda, warmup=cfg.lr_warmup_steps, total=cfg.steps, kind=cfg.lr_scheduler),
        last_epoch=start_step - 1 if start_step else -1)
    end = cfg.steps if end_step is None else min(end_step, cfg.steps)
    model_p, opt_p = accelerator.prepare(model, inner)
    unwrapped = accelerator.unwrap_model(model_p)
    all_hooks = list(hooks) + list(make_hooks(unwrapped, opt_p) if make_hooks is not None else [])
    stateful: dict[str, Any] = {"optimizer": opt_p, "scheduler": scheduler}
    for hook in all_hooks:
        if hook.state_name:
            if hook.state_name in stateful:
                raise ConfigError(f"two step hooks share the checkpoint name {hook.state_name!r}")
            stateful[hook.state_name] = hook
    mutable = {n for n, p in unwrapped.named_parameters() if p.requires_grad} | set(extra_params)
    for hook in all_hooks:
        mutable |= set(hook.mutable_parameter_names())
    param_names = sorted(mutable)

    log: list[dict[str, Any]] = []
    start, resumed_from, elapsed_before = start_step, None, 0.0
    settings = json.loads(json.dumps(run_settings or {}))  # as stored: JSON types
    if not resume and checkpoint_dir is not None and latest_checkpoint(checkpoint_dir) is not None:
        raise CheckpointError(f"{checkpoint_dir} holds checkpoints of an earlier run; resume it (--resume) or "
                              f"start over (--force)")
    if resume:
        if checkpoint_dir is None:
            raise ConfigError("resume needs a checkpoint directory")
        found = resume_checkpoint(checkpoint_dir, settings, model=unwrapped, stateful=stateful,
                                  accelerator=accelerator)
        if found is None:
            logger.warning("no checkpoint in %s; starting from step 0", checkpoint_dir)
        else:
            ckpt, state = found
            start = resumed_from = int(state["step"])
            tokens = int(state.get("tokens_seen", 0))
            log = list(state.get("log", []))
            elapsed_before = float(state.get("wall_time_s", 0.0))
            logger.info("resumed from %s (step %d)", ckpt, start)
    world, rank = accelerator.num_processes, accelerator.process_index
    seq_len = data.shape[1]
    step_tokens = cfg.batch_size * cfg.grad_accum * world * seq_len
    if resumed_from is None:
        tokens = start * step_tokens
    model_p.train()
    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.steps, initial=start, desc=desc, unit="step", dynamic_ncols=True,
               disable=not cfg.progress or not accelerator.is_local_main_process or progress_disabled())
    t0 = time.perf_counter()
    t_last, tok_last = t0, tokens
    step = start
    stopped = False
    device = accelerator.device
    while step < end:
        loss_sum = torch.zeros((), device=device)
        for m in range(cfg.grad_accum):
            for hook in all_hooks:
                hook.before_micro_batch(step, m)
            idx = batch_indices(data.shape[0], (step - data_start) * cfg.grad_accum + m, cfg.batch_size,
                                seed=cfg.seed, rank=rank, world=world)
            batch = data[idx].to(device)
            sync = m == cfg.grad_accum - 1
            ctx = contextlib.nullcontext() if sync or world == 1 else accelerator.no_sync(model_p)
            with ctx:
                loss = loss_fn(model_p, batch) / cfg.grad_accum
                accelerator.backward(loss)
            loss_sum += loss.detach()
        if cfg.max_grad_norm > 0:  # the optimizer's parameters: a hook may have replaced them (compaction)
            accelerator.clip_grad_norm_([p for g in inner.param_groups for p in g["params"]], cfg.max_grad_norm)
        opt_p.step()
        for hook in all_hooks:
            hook.after_optimizer_step(step)
        scheduler.step()
        opt_p.zero_grad(set_to_none=True)
        step += 1
        tokens += step_tokens
        mean_loss = float(accelerator.reduce(loss_sum, "mean")) if world > 1 else float(loss_sum)
        if not math.isfinite(mean_loss):
            raise ConfigError(f"the training loss became {mean_loss} at step {step}; lower --lr")
        now = time.perf_counter()
        tok_s = (tokens - tok_last) / max(now - t_last, 1e-9)
        t_last, tok_last = now, tokens
        if step % cfg.log_every == 0 or step == cfg.steps:
            record = {"step": step, "loss": mean_loss, "lr": scheduler.get_last_lr()[0]}
            for hook in all_hooks:
                record.update(hook.log_fields())
            record.update({"tokens": tokens, "tokens_per_s": tok_s})
            log.append(record)
        postfix = {"loss": f"{mean_loss:.3f}"}
        for hook in all_hooks:
            postfix.update(hook.progress_fields())
        postfix["tok_s"] = f"{tok_s:.0f}"
        bar.set_postfix(refresh=False, **postfix)
        bar.update(1)
        if checkpoint_dir is not None and cfg.checkpoint_every and (step % cfg.checkpoint_every == 0):
            save_checkpoint(checkpoint_dir, step=step, model=unwrapped, param_names=param_names, stateful=stateful,
                            accelerator=accelerator, keep=cfg.keep_checkpoints,
                            state={"run_settings": settings, "tokens_seen": tokens, "log": log,
                                   "wall_time_s": elapsed_before + time.perf_counter() - t0,
                                   "world_size": world, "data_position": step * cfg.grad_accum,
                                   **(extra_state or {})})
        if stop_after is not None and step >= stop_after and step < end:
            stopped = True
            break
    bar.close()
    for hook in all_hooks:
        hook.close()
    model_p.eval()
    if cfg.grad_checkpointing:
        unwrapped.gradient_checkpointing_disable()
    accelerator.wait_for_everyone()
    return TrainResult(log=log, steps_done=step, tokens_seen=tokens,
                       wall_time_s=elapsed_before + time.perf_counter() - t0, resumed_from=resumed_from,
                       stopped_early=stopped)


def resume_checkpoint(checkpoint_dir: str | os.PathLike[str], settings: dict[str, Any], *, model: torch.nn.Module,
                      stateful: dict[str, Any], accelerator: Any = None) -> tuple[Path, dict[str, Any]] | None:
    """Load the newest usable checkpoint under ``checkpoint_dir`` into ``model``/``stateful``.

    Checkpoints are tried newest first: one with a missing, truncated or unreadable file is skipped
    with a warning (the run falls back to the previous complete one); when none is usable, one line
    names the bad file. A checkpoint of another run (other settings) is refused at once. Returns
    ``(checkpoint, state)``, or ``None`` when there is no checkpoint at all.
    """
    found = [path for _, path in reversed(list_checkpoints(checkpoint_dir))]
    if not found:
        return None
    errors: list[CorruptCheckpointError] = []
    for ckpt in found:
        try:
            check_run_settings(ckpt, settings)
            state = load_checkpoint(ckpt, model=model, stateful=stateful, accelerator=accelerator)
        except CorruptCheckpointError as exc:
            errors.append(exc)
            logger.warning("%s; trying an earlier checkpoint", exc)
            continue
        if errors:
            logger.warning("resuming from %s, the newest complete checkpoint", ckpt)
        return ckpt, state
    first = errors[0]
    earlier = f" (and {len(errors) - 1} earlier one(s) too)" if len(errors) > 1 else ""
    raise CorruptCheckpointError(f"{first}{earlier}; no usable checkpoint left: delete {Path(checkpoint_dir)} or "
                                 f"start over with --force") from first


def check_run_settings(checkpoint: Path, settings: dict[str, Any]) -> None:
    """Refuse to resume ``checkpoint`` if it was written by a run with other settings."""
    from .checkpoint import read_state

    stored = read_state(checkpoint).get("run_settings", {})
    if not isinstance(stored, dict):
        raise CorruptCheckpointError(f"checkpoint file {checkpoint / 'state.json'} is corrupt (no run settings)")
    for key in sorted(set(stored) | set(settings)):
        if stored.get(key) != settings.get(key):
            raise CheckpointError(f"the checkpoint in {checkpoint.parent} belongs to another run ({key}: "
                                  f"{stored.get(key)!r} there, {settings.get(key)!r} now); start over with --force "
                                  f"or use another --out")


def checkpoint_root(out_dir: str | os.PathLike[str]) -> Path:
    return Path(out_dir) / "checkpoints"
