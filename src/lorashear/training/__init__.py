"""The LHSPG training loop (accelerate) with atomic checkpoints and bit-identical resume."""

from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .loop import TrainConfig, TrainResult, batch_indices, train_lhspg

__all__ = ["TrainConfig", "TrainResult", "batch_indices", "latest_checkpoint", "load_checkpoint",
           "save_checkpoint", "train_lhspg"]
