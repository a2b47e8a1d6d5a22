"""The LHSPG training loop on accelerate: one code path for CPU, one GPU and multi-GPU.

Run it as a library call or under ``accelerate launch`` (DDP: every process
holds the whole model, gradients of the LoRA factors are all-reduced, the LHSPG
update of the frozen base weights is computed identically on every rank and
group selection is broadcast from rank 0). FSDP: the LHSPG update gathers rows
of full base weights, so it needs unsharded parameters; use
``accelerate launch --use_fsdp --fsdp_use_orig_params true`` with
``FULL_SHARD`` wrapped per decoder layer and ``summon_full_params`` is *not*
done for you — DDP is the tested multi-GPU path.

Data: a ``LongTensor[N, seq_len]`` of packed sequences (``lorashear.data.pack_texts``).
Micro-batch ``i`` of the run is a pure function of ``(seed, i)`` — a fresh seeded
permutation per epoch, each process taking its own slice — so the step number is
the data position and resuming needs no sampler state.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from ..errors import ConfigError
from ..graph.groups import Group
from ..lhspg.optimizer import LHSPG, LHSPGConfig, lora_parameters, make_optimizer
from ..lhspg.targets import TargetPlan
from ..progress import progress_disabled
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint

logger = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Settings of the LoRA training loop that drives LHSPG."""

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
    seed: int = field(default=0, metadata={"help": "seed of LoRA init, dropout and data order"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr_warmup_steps", "checkpoint_every", "keep_checkpoints"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if self.max_grad_norm < 0:
            raise ConfigError(f"max_grad_norm must be >= 0, got {self.max_grad_norm}")


@dataclass
class TrainResult:
    lhspg: LHSPG
    log: list[dict[str, Any]]
    steps_done: int
    tokens_seen: int
    wall_time_s: float
    resumed_from: int | None
    stopped_early: bool


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


def _progress_disabled(cfg: TrainConfig, accelerator: Any) -> bool:
    return not cfg.progress or not accelerator.is_local_main_process or progress_disabled()


def train_lhspg(
    model: torch.nn.Module,
    groups: Sequence[Group],
    plan: TargetPlan,
    data: torch.Tensor,
    *,
    train_config: TrainConfig | None = None,
    lhspg_config: LHSPGConfig | None = None,
    exclude: Iterable[int] = (),
    checkpoint_dir: str | os.PathLike[str] | None = None,
    resume: bool = False,
    accelerator: Any = None,
    stop_after: int | None = None,
    on_step: Callable[[int, LHSPG], None] | None = None,
) -> TrainResult:
    """Train the LoRA factors of ``model`` with LHSPG until ``plan`` is reached (masked model, in place).

    Args:
        model: a peft LoRA model; its LoRA factors are the only trainable parameters.
        groups: candidate groups (named on ``model``'s parameters).
        plan: group counts from :func:`~lorashear.lhspg.targets.plan_targets`.
        data: packed token ids ``(N, seq_len)``.
        exclude: group ids never to prune.
        checkpoint_dir: where checkpoints go (needed for ``checkpoint_every`` and ``resume``).
        resume: continue from the latest checkpoint in ``checkpoint_dir`` if there is one.
        accelerator: an ``accelerate.Accelerator``; one is created from the config when omitted.
        stop_after: stop after this many steps in total (a deliberate interruption; tests use it).
        on_step: called as ``on_step(step, lhspg)`` after every optimizer step.

    Returns a :class:`TrainResult`; the committed groups of ``result.lhspg`` are exactly zero in ``model``.
    """
    from accelerate.utils import broadcast_object_list, set_seed

    cfg = train_config or TrainConfig()
    lcfg = lhspg_config or LHSPGConfig()
    if data.dim() != 2 or data.shape[0] == 0:
        raise ConfigError(f"training data must be a non-empty (N, seq_len) tensor, got shape {tuple(data.shape)}")
    if lcfg.schedule.prune_end > cfg.steps:
        raise ConfigError(f"pruning ends at step {lcfg.schedule.prune_end} but only {cfg.steps} steps are planned")
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
    inner = make_optimizer(params, cfg.optimizer, cfg.lr, cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(inner, functools.partial(
        lr_lambda, warmup=cfg.lr_warmup_steps, total=cfg.steps, kind=cfg.lr_scheduler))
    model_p, opt_p = accelerator.prepare(model, inner)
    unwrapped = accelerator.unwrap_model(model_p)

    def broadcast(chosen: list[int]) -> list[int]:
        if accelerator.num_processes == 1:
            return chosen
        box = [chosen]
        broadcast_object_list(box, from_process=0)
        return box[0]

    lhspg = LHSPG(unwrapped, groups, opt_p, plan=plan, config=lcfg, exclude=exclude, broadcast=broadcast)
    log: list[dict[str, Any]] = []
    start, tokens, resumed_from, elapsed_before = 0, 0, None, 0.0
    if resume:
        if checkpoint_dir is None:
            raise ConfigError("resume needs a checkpoint directory")
        ckpt = latest_checkpoint(checkpoint_dir)
        if ckpt is None:
            logger.warning("no checkpoint in %s; starting from step 0", checkpoint_dir)
        else:
            state = load_checkpoint(ckpt, model=unwrapped, lhspg=lhspg, scheduler=scheduler, accelerator=accelerator)
            start = resumed_from = int(state["step"])
            tokens = int(state.get("tokens_seen", 0))
            log = list(state.get("log", []))
            elapsed_before = float(state.get("wall_time_s", 0.0))
            logger.info("resumed from %s (step %d)", ckpt, start)
    world, rank = accelerator.num_processes, accelerator.process_index
    seq_len = data.shape[1]
    step_tokens = cfg.batch_size * cfg.grad_accum * world * seq_len
    model_p.train()
    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.steps, initial=start, desc="prune", unit="step",
               disable=_progress_disabled(cfg, accelerator), dynamic_ncols=True)
    t0 = time.perf_counter()
    t_last, tok_last = t0, tokens
    step = start
    stopped = False
    device = accelerator.device
    while step < cfg.steps:
        loss_sum = torch.zeros((), device=device)
        for m in range(cfg.grad_accum):
            idx = batch_indices(data.shape[0], step * cfg.grad_accum + m, cfg.batch_size, seed=cfg.seed,
                                rank=rank, world=world)
            batch = data[idx].to(device)
            sync = m == cfg.grad_accum - 1
            ctx = contextlib.nullcontext() if sync or world == 1 else accelerator.no_sync(model_p)
            with ctx:
                out = model_p(input_ids=batch, labels=batch, use_cache=False)
                loss = out.loss / cfg.grad_accum
                accelerator.backward(loss)
            loss_sum += loss.detach()
        if cfg.max_grad_norm > 0:
            accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
        lhspg.step()
        scheduler.step()
        lhspg.zero_grad(set_to_none=True)
        step += 1
        tokens += step_tokens
        if on_step is not None:
            on_step(step, lhspg)
        mean_loss = float(accelerator.reduce(loss_sum, "mean")) if world > 1 else float(loss_sum)
        now = time.perf_counter()
        tok_s = (tokens - tok_last) / max(now - t_last, 1e-9)
        t_last, tok_last = now, tokens
        if step % cfg.log_every == 0 or step == cfg.steps:
            log.append({"step": step, "loss": mean_loss, "lr": scheduler.get_last_lr()[0],
                        "group_sparsity": lhspg.sparsity(), "committed": len(lhspg.committed),
                        "redundant": len(lhspg.redundant), "phase": lhspg.phase, "tokens": tokens,
                        "tokens_per_s": tok_s})
        bar.set_postfix(loss=f"{mean_loss:.3f}", sparsity=f"{lhspg.sparsity():.3f}", tok_s=f"{tok_s:.0f}",
                        refresh=False)
        bar.update(1)
        if checkpoint_dir is not None and cfg.checkpoint_every and (step % cfg.checkpoint_every == 0):
            save_checkpoint(checkpoint_dir, step=step, model=unwrapped, lhspg=lhspg, scheduler=scheduler,
                            accelerator=accelerator, keep=cfg.keep_checkpoints,
                            state={"tokens_seen": tokens, "log": log,
                                   "wall_time_s": elapsed_before + time.perf_counter() - t0,
                                   "world_size": world, "data_position": step * cfg.grad_accum})
        if stop_after is not None and step >= stop_after and step < cfg.steps:
            stopped = True
            break
    bar.close()
    model_p.eval()
    if cfg.grad_checkpointing:
        unwrapped.gradient_checkpointing_disable()
    accelerator.wait_for_everyone()
    return TrainResult(lhspg=lhspg, log=log, steps_done=step, tokens_seen=tokens,
                       wall_time_s=elapsed_before + time.perf_counter() - t0, resumed_from=resumed_from,
                       stopped_early=stopped)


def checkpoint_root(out_dir: str | os.PathLike[str]) -> Path:
    return Path(out_dir) / "checkpoints"
