"""LoRA fine-tuning of any causal LM, merged back into plain weights at the end.

Recipe::

    ids = pack_texts(texts, tokenizer, seq_len)            # (N, seq_len), or given directly
    peft = get_peft_model(model, LoraConfig(r, alpha, dropout, q,k,v,o,gate,up,down))
    for step in range(steps):                              # AdamW on the LoRA factors only
        batch = ids[batch_indices(N, step, batch_size, seed)]   # (B, seq_len)
        loss = peft(input_ids=batch, labels=batch).loss; loss.backward(); clip; step
    model = peft.merge_and_unload()                        # plain model, no peft modules left

It works on models of any width, including pruned models whose layers differ.
Determinism: LoRA initialisation, dropout and the data order are functions of
``seed`` alone (drawn inside ``torch.random.fork_rng``, so the caller's global RNG
state is left as it was); the same model, data and config give bit-identical
weights on the same machine. Micro-batch ``i`` is the same function of
``(seed, i)`` as in the prune stage's loop (:func:`lorashear.training.batch_indices`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch

from ..errors import ConfigError, DataError
from ..progress import progress_disabled

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class FinetuneConfig:
    """Settings of one LoRA fine-tuning run (budget = ``steps * batch_size * seq_len`` tokens)."""

    steps: int = field(default=100, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=4, metadata={"help": "sequences per optimizer step"})
    seq_len: int = field(default=256, metadata={"help": "tokens per training sequence"})
    lr: float = field(default=2e-4, metadata={"help": "AdamW learning rate of the LoRA factors"})
    r: int = field(default=8, metadata={"help": "LoRA rank"})
    alpha: int = field(default=16, metadata={"help": "LoRA alpha (scale = alpha / r)"})
    dropout: float = field(default=0.05, metadata={"help": "LoRA dropout"})
    target_modules: tuple[str, ...] = field(default=DEFAULT_LORA_TARGETS, metadata={
        "help": "module names that get LoRA"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay of the LoRA factors"})
    lr_scheduler: Literal["constant", "linear", "cosine"] = field(default="constant", metadata={
        "help": "learning-rate schedule after its warm-up"})
    lr_warmup_steps: int = field(default=0, metadata={"help": "linear learning-rate warm-up steps"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm (0 = off)"})
    grad_checkpointing: bool = field(default=False, metadata={"help": "recompute activations in backward"})
    num_sequences: int | None = field(default=None, metadata={
        "help": "packed sequences to draw from when given texts (default: all that fit)"})
    log_every: int = field(default=10, metadata={"help": "log the loss every N steps"})
    seed: int = field(default=0, metadata={"help": "seed of LoRA init, dropout, packing and data order"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})

    def __post_init__(self) -> None:
        self.target_modules = tuple(self.target_modules)
        for name in ("steps", "batch_size", "seq_len", "r", "alpha", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.seq_len < 2:
            raise ConfigError(f"seq_len must be >= 2 (a next-token loss needs two tokens), got {self.seq_len}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"lr must be a positive number, got {self.lr}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.weight_decay < 0 or self.max_grad_norm < 0 or self.lr_warmup_steps < 0:
            raise ConfigError("weight_decay, max_grad_norm and lr_warmup_steps must be >= 0")
        if self.lr_scheduler not in ("constant", "linear", "cosine"):
            raise ConfigError(f"lr_scheduler must be constant, linear or cosine, got {self.lr_scheduler!r}")
        if self.num_sequences is not None and self.num_sequences < 1:
            raise ConfigError(f"num_sequences must be >= 1, got {self.num_sequences}")
        if not self.target_modules:
            raise ConfigError("target_modules is empty")

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def budget_tokens(self) -> int:
        """Training tokens the run consumes (``steps * batch_size * seq_len``)."""
        return self.steps * self.tokens_per_step


@dataclass
class FinetuneResult:
    """The merged model and a record of the run."""

    model: Any
    losses: list[float]  #: training loss of every step
    steps: int
    tokens_seen: int
    trainable_params: int  #: LoRA parameters trained
    wall_time_s: float
    sequences: int  #: packed sequences the batches were drawn from

    def summary(self) -> dict[str, Any]:
        head = self.losses[: max(1, len(self.losses) // 10)]
        tail = self.losses[-max(1, len(self.losses) // 10):]
        return {"steps": self.steps, "tokens_seen": self.tokens_seen, "trainable_params": self.trainable_params,
                "wall_time_s": self.wall_time_s, "sequences": self.sequences,
                "loss_first": sum(head) / len(head), "loss_last": sum(tail) / len(tail)}


def _sequences(data: Sequence[str] | torch.Tensor, tokenizer: PreTrainedTokenizerBase | None,
               cfg: FinetuneConfig) -> torch.Tensor:
    """Training data as ``(N, seq_len)`` token ids."""
    if isinstance(data, torch.Tensor):
        ids = data.long()
        if ids.dim() == 1:  # a token stream: cut into windows, drop the remainder
            n = ids.numel() // cfg.seq_len
            if n == 0:
                raise DataError(f"the token stream has {ids.numel()} tokens, fewer than seq_len={cfg.seq_len}")
            ids = ids[: n * cfg.seq_len].view(n, cfg.seq_len)
        elif ids.dim() != 2 or ids.shape[0] == 0:
            raise ConfigError(f"token ids must be (T,) or (N, seq_len), got shape {tuple(ids.shape)}")
        elif ids.shape[1] != cfg.seq_len:
            raise ConfigError(f"packed sequences have {ids.shape[1]} tokens but seq_len is {cfg.seq_len}")
        if cfg.num_sequences is not None:
            ids = ids[: cfg.num_sequences]
        return ids
    if isinstance(data, str):
        raise ConfigError("give a list of texts (or token ids), not a single string")
    if tokenizer is None:
        raise ConfigError("a tokenizer is needed to train on texts")
    from ..data import pack_texts

    return pack_texts(list(data), tokenizer, cfg.seq_len, num_sequences=cfg.num_sequences, seed=cfg.seed)


def finetune(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    data: Sequence[str] | torch.Tensor,
    config: FinetuneConfig | None = None,
) -> FinetuneResult:
    """LoRA fine-tune ``model`` on ``data`` (texts or token ids) and merge; see the module docstring.

    ``model`` is changed in place (its weights receive the merged LoRA update) and
    returned in ``result.model`` without any peft module, in the train/eval mode it had.
    """
    from peft import LoraConfig, get_peft_model
    from tqdm.auto import tqdm

    from ..training.loop import batch_indices, lr_lambda

    cfg = config or FinetuneConfig()
    if hasattr(model, "peft_config"):
        raise ConfigError("the model already carries peft adapters; merge them first (merge_and_unload)")
    present = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    targets = [t for t in cfg.target_modules if t in present]
    if not targets:
        raise ConfigError(f"none of the LoRA target modules {list(cfg.target_modules)} is a Linear in the model")
    ids = _sequences(data, tokenizer, cfg)
    device = next(model.parameters()).device
    was_training = model.training
    requires_grad = {id(p): p.requires_grad for p in model.parameters()}
    rng_devices = [device] if device.type == "cuda" else []
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=rng_devices):
        torch.manual_seed(cfg.seed)
        lora = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                          bias="none", task_type="CAUSAL_LM")
        peft_model = get_peft_model(model, lora)
        params = [p for p in peft_model.parameters() if p.requires_grad]
        trainable = sum(p.numel() for p in params)
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(
            lr_lambda, warmup=cfg.lr_warmup_steps, total=cfg.steps, kind=cfg.lr_scheduler))
        if cfg.grad_checkpointing:
            peft_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            peft_model.enable_input_require_grads()
        logger.info("LoRA fine-tuning: %d steps x %d x %d tokens (%d tokens), r=%d alpha=%d on %s, "
                    "%d trainable parameters, %d sequences", cfg.steps, cfg.batch_size, cfg.seq_len,
                    cfg.budget_tokens, cfg.r, cfg.alpha, ",".join(targets), trainable, ids.shape[0])
        losses: list[float] = []
        peft_model.train()
        bar = tqdm(total=cfg.steps, desc="lora finetune", unit="step", dynamic_ncols=True,
                   disable=not cfg.progress or progress_disabled())
        try:
            for step in range(cfg.steps):
                idx = batch_indices(ids.shape[0], step, cfg.batch_size, seed=cfg.seed)
                batch = ids[idx].to(device)  # (B, seq_len)
                loss = peft_model(input_ids=batch, labels=batch, use_cache=False).loss
                loss.backward()
                if cfg.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise ConfigError(f"the training loss became {value} at step {step + 1}; lower --lr")
                losses.append(value)
                bar.set_postfix(loss=f"{value:.3f}", refresh=False)
                bar.update(1)
                if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
                    logger.info("step %d/%d: loss %.4f", step + 1, cfg.steps, value)
        finally:
            bar.close()
            if cfg.grad_checkpointing:
                with contextlib.suppress(Exception):
                    peft_model.gradient_checkpointing_disable()
    merged = peft_model.merge_and_unload()
    merged.train(was_training)
    for p in merged.parameters():  # the base weights are the caller's tensors: give back their flags
        p.requires_grad_(requires_grad.get(id(p), p.requires_grad))
    wall = time.perf_counter() - t0
    return FinetuneResult(model=merged, losses=losses, steps=cfg.steps, tokens_seen=cfg.budget_tokens,
                          trainable_params=trainable, wall_time_s=wall, sequences=int(ids.shape[0]))


def lora_finetune(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    texts_or_ids: Sequence[str] | torch.Tensor,
    *,
    steps: int,
    batch_size: int,
    seq_len: int,
    lr: float = 2e-4,
    r: int = 8,
    alpha: int = 16,
    dropout: float = 0.05,
    seed: int = 0,
    **options: Any,
) -> PreTrainedModel:
    """LoRA fine-tune ``model`` (AdamW on q,k,v,o,gate,up,down LoRA factors), merge, return the plain model.

    ``texts_or_ids``: a list of texts (packed with ``tokenizer`` into ``seq_len`` windows),
    a ``(N, seq_len)`` tensor of packed ids or a ``(T,)`` token stream.
    Further :class:`FinetuneConfig` fields (``target_modules``, ``lr_scheduler``,
    ``max_grad_norm``, ``progress``, ...) can be passed as keywords.
    """
    try:
        cfg = FinetuneConfig(steps=steps, batch_size=batch_size, seq_len=seq_len, lr=lr, r=r, alpha=alpha,
                             dropout=dropout, seed=seed, **options)
    except TypeError as exc:
        raise ConfigError(f"bad fine-tuning option: {exc}") from exc
    return finetune(model, tokenizer, texts_or_ids, cfg).model


__all__ = ["DEFAULT_LORA_TARGETS", "FinetuneConfig", "FinetuneResult", "finetune", "lora_finetune"]
