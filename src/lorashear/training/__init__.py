"""The one training loop (accelerate), its losses and hooks, atomic checkpoints and bit-identical resume.

General pieces only: LHSPG's hooks and ``train_lhspg`` are in :mod:`lorashear.lhspg`, which builds on these.
"""

from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .hooks import StepHook
from .losses import lm_loss
from .loop import TrainConfig, TrainResult, batch_indices, train
from .optim import lora_parameters, make_optimizer

__all__ = ["StepHook", "TrainConfig", "TrainResult", "batch_indices", "latest_checkpoint", "lm_loss",
           "load_checkpoint", "lora_parameters", "make_optimizer", "save_checkpoint", "train"]
