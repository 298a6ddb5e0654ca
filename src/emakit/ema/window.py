"""A windowed average: the uniform average of the last ``window`` of updates, in bounded memory.

A window of ``B * K`` updates is kept as ``K`` blocks (``window_blocks``) of ``B`` updates each. The block being
filled is a running uniform average (``block = block + (w - block) / j`` at its ``j``-th update: one ``lerp`` per
update, the cost of an exponential average). When a block completes it joins the last completed ones (at most ``K``;
the oldest is dropped and its memory reused) and the visible average becomes their mean::

    visible = (block_1 + ... + block_k) / k        the last k <= K completed blocks, oldest dropped first

So the average holds exactly the last ``window`` updates at every block boundary (every ``window / K``), and between
boundaries the last ``K`` completed blocks: it lags the newest updates by fewer than ``window / K``. Before the first
block completes it is the uniform average of every update so far. Evaluate at multiples of ``window / K`` to measure
exactly the last ``window``. Memory: ``K + 1`` averages besides the visible one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from emakit.shadow import ShadowWeights

__all__ = ["Window"]


class Window:
    """The blocks behind one windowed average ``visible``; :meth:`update` after ``visible`` started.

    Args:
        visible: the average users see (swapped in, saved, exported); it holds the first block while that fills.
        make_block: a new, empty average of the same model (same dtype, device and sharding as ``visible``).
        per_block: updates per block (``B``).
        blocks: completed blocks kept (``K``).

    Example (a window of 6 updates in 3 blocks of 2)::

        >>> window = Window(visible, lambda: ShadowWeights(), per_block=2, blocks=3)
        >>> visible.copy_from_model(model); window.start(model)
        >>> window.update(model)    # visible: the mean of both updates, the first block complete
    """

    def __init__(
        self, visible: ShadowWeights, make_block: Callable[[], ShadowWeights], per_block: int, blocks: int
    ) -> None:
        self.visible = visible
        self.make_block = make_block
        self.per_block = per_block
        self.blocks = blocks
        self.completed: list[ShadowWeights] = []  # the last completed blocks, oldest first
        self.filling: ShadowWeights | None = None  # the block being filled, once the first one completed
        self.in_block = 0  # updates in the block being filled

    def start(self, model: nn.Module) -> None:
        """The visible average has just started at ``model``'s weights: the first block holds one update."""
        self.completed, self.filling, self.in_block = [], None, 1
        self._complete_if_full(model)

    def update(self, model: nn.Module) -> None:
        """Average ``model``'s weights into the block being filled; complete it when full."""
        block = self.filling if self.completed else self.visible  # the first block fills the visible average
        assert block is not None  # made when the first block completed
        if self.visible.attached_model() is None:  # loaded from a state: laid out now, as what an update writes is
            self.visible.attach(model)  # (ZeRO-3 partitions, FSDP1 shards and slices export only once laid out)
        if self.in_block == 0:
            block.copy_from_model(model)
        else:
            block.update(model, 1.0 / (self.in_block + 1))
        self.in_block += 1
        self._complete_if_full(model)

    def _complete_if_full(self, model: nn.Module) -> None:
        if self.in_block < self.per_block:
            return
        if self.completed:
            assert self.filling is not None
            self.completed.append(self.filling)
        else:  # the first block: a copy of the visible average joins the completed ones
            first = self.make_block()
            first.set_to_mean([self.visible], model)
            self.completed.append(first)
        reused = self.completed.pop(0) if len(self.completed) > self.blocks else None
        self.filling = reused if reused is not None else self.make_block()
        self.in_block = 0
        self.visible.set_to_mean(self.completed, model)

    # ------------------------------------------------------------------ state
    def state_dict(self, whole: bool = False) -> dict[str, Any]:
        """The blocks and the count of the one being filled (the visible average is saved by the EMA)."""

        def weights(block: ShadowWeights) -> dict:
            return block.whole_state_dict() if whole else block.state_dict()

        return {
            "per_block": self.per_block,
            "blocks": self.blocks,
            "in_block": self.in_block,
            "completed": [weights(block) for block in self.completed],
            "filling": weights(self.filling) if self.completed and self.in_block and self.filling else None,
        }

    def load_state_dict(self, state: dict[str, Any], partitioning: Any) -> None:
        """Continue from :meth:`state_dict`'s ``state`` (saved with the same ``per_block`` and ``blocks``)."""
        saved = (state.get("per_block"), state.get("blocks"))
        if saved != (self.per_block, self.blocks):
            raise ValueError(
                f"the window's state was saved with {saved[0]} updates per block and {saved[1]} blocks; this window "
                f"has {self.per_block} and {self.blocks}: build the EMA with the saved window and window_blocks"
            )

        def block(weights: dict) -> ShadowWeights:
            made = self.make_block()
            made.load_state_dict(weights, partitioning=partitioning)
            return made

        self.completed = [block(weights) for weights in state["completed"]]
        self.in_block = int(state["in_block"])
        self.filling = block(state["filling"]) if state.get("filling") is not None else self.make_block()

    @property
    def nbytes(self) -> int:
        """Bytes held by the blocks (the visible average's not included)."""
        return sum(block.nbytes for block in [*self.completed, *([self.filling] if self.filling else [])])
