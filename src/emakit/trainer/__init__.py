"""The trainer and its checkpoint files."""

from emakit.trainer.trainer import Trainer

__all__ = ["Trainer"]
