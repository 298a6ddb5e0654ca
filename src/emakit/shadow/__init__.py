"""The EMA storage engine: the averaged weights of one model, kept in flat buffers of its own.

Layout. The model's tracked tensors (see :mod:`emakit.tracked`: what ``state_dict()`` holds)
are grouped by (kind, device, dtype), kind being parameters, buffers (both averaged) or
integer buffers (copied). Per group the average lives in one flat buffer; each tensor's
average is its slice, with its own storage object. See :mod:`emakit.storage` for the groups.

By default the model's tensors are never re-pointed: nothing another library or the user holds
(an optimizer's bucket views, shared memory, numpy views, CUDA graph addresses, aliases) is
invalidated. An update reads each tensor once (``torch._foreach_lerp_``). A swap parks the
model's values in a buffer of its own and copies the average in; the average itself is never
written while swapped in, so whatever runs inside a swap (a train-mode forward, an optimizer
step) never reaches it: ``swap_out`` compares every parameter byte for byte with the average,
puts the training weights back, and raises, naming it, when one was written in place.

``flatten_model=True`` binds the model's tensors into one flat buffer per group (each keeps
its own storage object): an update is one ``lerp_`` per group and a parameter swap exchanges
storage pointers. See the README for what this changes about the model.

Staleness. Before every use :class:`~emakit.tracked.TrackedTensors` checks, without a Python
loop per tensor, that the model still holds the same tensors at the same addresses. A moved
``.data`` of the same shape is followed (re-bound under ``flatten_model``); a replaced tensor of
the same shape keeps its average; a new or reshaped tensor starts its average from its value
(with a warning); the groups are laid out again, carrying the average over by name.

One idea per module:

    weights.py       ShadowWeights: update, copy in and out, the check before each use
    layout.py        the groups laid out for a model; following a model whose tensors changed
    asynchronous.py  updates on a side stream (buffers now, parameters on the side)
    swaps.py         swaps in and out, and the per-model stack that makes them nest
    state.py         state_dict / load_state_dict / model_state_dict, and ema_model's copy
"""

from emakit.shadow.layout import resolve_ema_dtype
from emakit.shadow.swaps import swapped_into
from emakit.shadow.weights import ShadowWeights

__all__ = ["ShadowWeights", "resolve_ema_dtype", "swapped_into"]
