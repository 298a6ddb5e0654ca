""":class:`~emakit.integrations.lightning.EMACallback` with ``save_best="average"``: checkpoints hold the average.

Validation measures the average (``eval_weights="ema"``), so a ``ModelCheckpoint(monitor="val_loss")`` ranks the
average; with ``save_best="average"`` each checkpoint keeps what was ranked::

    checkpoint["state_dict"]                                    = the average, keyed like the module's state_dict
    checkpoint["callbacks"][state_key]["training_state_dict"]   = the training weights (to resume from)

``LightningModule.load_from_checkpoint(path)`` then gives the average. On ``trainer.fit(..., ckpt_path=path)``
Lightning loads ``"state_dict"`` into the module before any callback sees the checkpoint (``restore_model`` runs
before ``restore_callbacks`` in Lightning 2.6), so :func:`training_back` puts the training weights back into
``checkpoint["state_dict"]`` and loads them into the module through the strategy: training resumes exactly. Before
the average has started, validation measured the training weights, and the checkpoint holds them as usual.

Single process and DDP only: under sharding strategies the callback's state is written by rank 0 alone (``meta.pt``,
DeepSpeed's ``client_state``: :mod:`emakit.integrations.lightning_sharded`), where the training weights, split over
the ranks, cannot ride; :func:`refuse_sharded` says so at setup.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch

from emakit.ema import EMA

__all__ = ["TRAINING_KEY", "average_into", "module_weights", "refuse_sharded", "training_back"]

TRAINING_KEY = "training_state_dict"


def refuse_sharded(trainer: pl.Trainer) -> None:
    """Raise ValueError for ``save_best="average"`` under a strategy that shards the module."""
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

    strategy = trainer.strategy
    if isinstance(strategy, (DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy)):
        raise ValueError(
            f"EMACallback(save_best='average') is not supported under {type(strategy).__name__}: the callback's state "
            "is written by rank 0 alone, and the training weights, sharded over the ranks, cannot ride in it to "
            "resume from; use save_best='training' (the default) and export the average with "
            "callback.save_ema_weights(path), or train on one device or with strategy='ddp'"
        )


def module_weights(trainer: pl.Trainer, ema: EMA, pl_module: pl.LightningModule, average: bool) -> dict[str, Any]:
    """The module's state dict as the strategy saves it (``strategy.lightning_module_state_dict()``), holding the
    average (``average=True``) or the training weights, whichever is in the module now; tensors cloned, so a later
    swap does not change them."""
    inside = ema.ema_weights(pl_module) if average else ema.training_weights(pl_module)
    with inside:
        weights = trainer.strategy.lightning_module_state_dict()
        return {k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in weights.items()}


def average_into(
    checkpoint: dict[str, Any], state_key: str, trainer: pl.Trainer, ema: EMA, pl_module: pl.LightningModule
) -> None:
    """``checkpoint["state_dict"]`` becomes the average; the training weights go into the callback's state under
    :data:`TRAINING_KEY` (where there is one: a ``save_weights_only`` checkpoint has no callback states and cannot
    resume anyway)."""
    training = module_weights(trainer, ema, pl_module, average=False)
    checkpoint["state_dict"] = module_weights(trainer, ema, pl_module, average=True)
    state = checkpoint.get("callbacks", {}).get(state_key)
    if isinstance(state, dict):
        state[TRAINING_KEY] = training


def training_back(
    checkpoint: dict[str, Any], state_key: str, trainer: pl.Trainer, pl_module: pl.LightningModule
) -> None:
    """Where the callback's state in ``checkpoint`` holds training weights (:func:`average_into`), put them back into
    ``checkpoint["state_dict"]`` and into the module (which Lightning loaded with the average already)."""
    state = checkpoint.get("callbacks", {}).get(state_key)
    training = state.pop(TRAINING_KEY, None) if isinstance(state, dict) else None
    if training is None:
        return
    checkpoint["state_dict"] = training
    trainer.strategy.load_model_state_dict(checkpoint, strict=pl_module.strict_loading)
