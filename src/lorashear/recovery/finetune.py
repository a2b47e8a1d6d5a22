"""LoRA fine-tuning of any causal LM, merged back into plain weights at the end.

Recipe::

    ids = pack_texts(texts, tokenizer, seq_len)            # (N, seq_len), or given directly
    peft = attach_lora(model, config.lora)                 # the family's projections
    train(peft, ids, config=config.train, loss_fn=lm_loss)  # the shared loop: AdamW on the LoRA factors
    model = peft.merge_and_unload()                        # plain model, no peft modules left

It works on models of any width, including pruned models whose layers differ.
Determinism: LoRA initialisation, dropout and the data order are functions of
``seed`` alone (drawn inside ``torch.random.fork_rng``; the caller's torch, Python and
NumPy RNG states are left as they were); the same model, data and config give bit-identical
weights on the same machine. Micro-batch ``i`` is the same function of
``(seed, i)`` as in the prune stage's loop (:func:`lorashear.training.batch_indices`).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..config import config_from_dict, section
from ..errors import ConfigError, DataError
from ..models.lora import LoraSettings, attach_lora
from ..training.loop import StepHook, TrainConfig, train
from ..training.losses import LossFn, lm_loss

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)


@dataclass
class FinetuneConfig:
    """One LoRA fine-tuning run on the shared training loop (budget = ``steps * batch_size * seq_len`` tokens)."""

    seq_len: int = field(default=256, metadata={"help": "tokens per training sequence"})
    num_sequences: int | None = field(default=None, metadata={
        "help": "packed sequences to draw from when given texts (default: all that fit)"})
    lora: LoraSettings = section(LoraSettings, prefix="lora_", help="LoRA factors")
    train: TrainConfig = section(TrainConfig, help="training loop", steps=100, log_every=1)

    def __post_init__(self) -> None:
        if self.seq_len < 2:
            raise ConfigError(f"seq_len must be >= 2 (a next-token loss needs two tokens), got {self.seq_len}")
        if self.num_sequences is not None and self.num_sequences < 1:
            raise ConfigError(f"num_sequences must be >= 1, got {self.num_sequences}")

    @property
    def tokens_per_step(self) -> int:
        return self.train.batch_size * self.train.grad_accum * self.seq_len

    @property
    def budget_tokens(self) -> int:
        """Training tokens the run consumes (``steps * batch_size * seq_len``)."""
        return self.train.steps * self.tokens_per_step


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

    return pack_texts(list(data), tokenizer, cfg.seq_len, num_sequences=cfg.num_sequences, seed=cfg.train.seed)


class LoraRun:
    """One set of LoRA factors on ``model`` and the optimizer over them, trained over one or more calls.

    :func:`finetune` is one call then :meth:`merge`; the recover stage may keep one run through
    all rounds of a stage, so the factors and the optimizer's moments carry from round to round.
    The factors are drawn from ``seed`` inside ``torch.random.fork_rng`` (the caller's RNG states are
    left as they were, also by :meth:`train`).
    """

    def __init__(self, model: PreTrainedModel, lora: LoraSettings, train_config: TrainConfig, *, seed: int) -> None:
        from ..training.optim import lora_parameters, make_optimizer

        self._was_training = model.training
        self._requires_grad = {id(p): p.requires_grad for p in model.parameters()}
        device = next(model.parameters()).device
        self._rng_devices = [device] if device.type == "cuda" else []
        with _caller_rng_kept(self._rng_devices):
            torch.manual_seed(seed)
            self.model = attach_lora(model, lora)
        params = lora_parameters(self.model)
        self.trainable_params = sum(p.numel() for p in params)
        self.optimizer = make_optimizer(params, train_config.optimizer, train_config.lr, train_config.weight_decay)

    def train(self, ids: torch.Tensor, config: TrainConfig, *, loss_fn: LossFn = lm_loss,
              hooks: Sequence[StepHook] = ()) -> FinetuneResult:
        """``config.steps`` more steps on the packed ``ids`` (``config.seed``: dropout and data order)."""
        t0 = time.perf_counter()
        with _caller_rng_kept(self._rng_devices):  # train() seeds itself from config.seed
            result = train(self.model, ids, config=config, loss_fn=loss_fn, hooks=hooks, desc="lora finetune",
                           optimizer=self.optimizer)
        return FinetuneResult(model=self.model, losses=result.losses, steps=result.steps_done,
                              tokens_seen=result.tokens_seen, trainable_params=self.trainable_params,
                              wall_time_s=time.perf_counter() - t0, sequences=int(ids.shape[0]))

    def merge(self) -> PreTrainedModel:
        """The plain model with the factors merged into its weights (no peft module left), in the
        train/eval mode and with the ``requires_grad`` flags it had before."""
        merged = self.model.merge_and_unload()
        merged.train(self._was_training)
        for p in merged.parameters():  # the base weights are the caller's tensors: give back their flags
            p.requires_grad_(self._requires_grad.get(id(p), p.requires_grad))
        return merged


class _caller_rng_kept:
    """``torch.random.fork_rng`` that also restores Python's and NumPy's RNG states."""

    def __init__(self, devices: list[torch.device]) -> None:
        self._fork = torch.random.fork_rng(devices=devices)

    def __enter__(self) -> None:
        self._py, self._np = random.getstate(), np.random.get_state()
        self._fork.__enter__()

    def __exit__(self, *exc: Any) -> None:
        self._fork.__exit__(*exc)
        random.setstate(self._py)
        np.random.set_state(self._np)


def finetune(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    data: Sequence[str] | torch.Tensor,
    config: FinetuneConfig | None = None,
    *,
    loss_fn: LossFn = lm_loss,
    hooks: Sequence[StepHook] = (),
) -> FinetuneResult:
    """LoRA fine-tune ``model`` on ``data`` (texts or token ids) and merge; see the module docstring.

    ``model`` is changed in place (its weights receive the merged LoRA update) and
    returned in ``result.model`` without any peft module, in the train/eval mode it had.
    ``loss_fn`` and ``hooks`` plug into the shared loop (:func:`lorashear.training.train`).
    """
    cfg = config or FinetuneConfig()
    ids = _sequences(data, tokenizer, cfg)
    t0 = time.perf_counter()
    run = LoraRun(model, cfg.lora, cfg.train, seed=cfg.train.seed)
    logger.info("LoRA fine-tuning: %d steps x %d x %d tokens (%d tokens), r=%d alpha=%d, "
                "%d trainable parameters, %d sequences", cfg.train.steps, cfg.train.batch_size, cfg.seq_len,
                cfg.budget_tokens, cfg.lora.r, cfg.lora.alpha, run.trainable_params, ids.shape[0])
    result = run.train(ids, cfg.train, loss_fn=loss_fn, hooks=hooks)
    result.model = run.merge()
    result.wall_time_s = time.perf_counter() - t0
    return result


def lora_finetune(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    texts_or_ids: Sequence[str] | torch.Tensor,
    *,
    steps: int,
    batch_size: int,
    seq_len: int,
    **options: Any,
) -> PreTrainedModel:
    """LoRA fine-tune ``model`` (AdamW on the family's projections), merge, return the plain model.

    ``texts_or_ids``: a list of texts (packed with ``tokenizer`` into ``seq_len`` windows),
    a ``(N, seq_len)`` tensor of packed ids or a ``(T,)`` token stream. Further options are the
    flat names of :class:`FinetuneConfig` (``lr``, ``seed``, ``r``/``lora_r``, ``alpha``, ``dropout``,
    ``targets``, ``lr_scheduler``, ``max_grad_norm``, ``progress``, ...).
    """
    short = {"r": "lora_r", "alpha": "lora_alpha", "dropout": "lora_dropout", "targets": "lora_targets"}
    values = {short.get(k, k): v for k, v in options.items()}
    values.update(steps=steps, batch_size=batch_size, seq_len=seq_len)
    cfg = config_from_dict(FinetuneConfig, values, source="lora_finetune options")
    return finetune(model, tokenizer, texts_or_ids, cfg).model


__all__ = ["FinetuneConfig", "FinetuneResult", "LoraRun", "finetune", "lora_finetune"]
