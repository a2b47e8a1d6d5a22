"""The one training loop (accelerate), its losses and hooks, atomic checkpoints and bit-identical resume."""

from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .loop import LHSPGHook, StepHook, TrainConfig, TrainResult, batch_indices, train, train_lhspg
from .losses import lm_loss

__all__ = ["LHSPGHook", "StepHook", "TrainConfig", "TrainResult", "batch_indices", "latest_checkpoint",
           "lm_loss", "load_checkpoint", "save_checkpoint", "train", "train_lhspg"]
