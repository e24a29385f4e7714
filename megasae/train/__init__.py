"""The training loop, its configuration, checkpoints and metrics."""

from megasae.train.config import TrainConfig
from megasae.train.step import sae_step
from megasae.train.trainer import Trainer, train

__all__ = ["TrainConfig", "Trainer", "sae_step", "train"]
