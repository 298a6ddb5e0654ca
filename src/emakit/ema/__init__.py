"""EMA by hand: an exponential moving average of a model's weights, in any training loop.

::

    first update:  ema = param                                   (the average starts at the weights)
    later updates: ema = smoothing * ema + (1 - smoothing) * param
                   smoothing = 2 ** (-(update_interval / half_life))

One idea per module:

    ema.py      EMA: its arguments, the update schedule (ema_start, update_interval, warmup), the run's length,
                as_algorithm (its adapter for emakit's Trainer: :mod:`emakit.algorithms.ema`, imported lazily)
    rates.py    the averages' smoothings from half-lives; whether a run is long enough for them
    averages.py which averages it keeps, in order: exponential, uniform (SWA), windowed
    window.py   a windowed average's blocks, combined into the average when one completes
    names.py    the averages' labels and the EMA's repr
    swaps.py    the average in the model and the training weights back (ema_weights, get_ema_model), update_bn
    exports.py  copies of the average out of the EMA: ema_model, ema_state_dict, save_ema_weights
    state.py    state_dict / load_state_dict, with the check that a state was saved with the same rates

The storage (flat buffers, swaps that park and check) is :class:`emakit.shadow.ShadowWeights`. Nothing here
imports the trainer (``tests/test_layers.py``). Example::

    ema = EMA(half_life="100ba")
    for batch in loader:
        train_step(model, batch)          # forward, backward, optimizer.step()
        ema.update(model)                 # once per optimizer step
    with ema.ema_weights(model):          # the average in the model, the training weights back after
        evaluate(model)
"""

from emakit.ema.ema import EMA

__all__ = ["EMA"]
