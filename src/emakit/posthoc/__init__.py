"""Post-hoc EMA: choose the EMA's length after training (Karras et al. 2024, EDM2).

From "Analyzing and Improving the Training Dynamics of Diffusion Models".

During training, power-function EMAs of the weights are kept, one per ``sigma_rel``. At time
``t`` (in optimizer steps) the average weighs the weights of time ``tau <= t`` by ``tau ** gamma``,
which is what the per-update factor ::

    beta = (1 - dt / t) ** (gamma + 1)          ema = beta * ema + (1 - beta) * w

gives when the average is updated every ``dt`` steps (the first update, ``t = dt``, copies). The
relative width of that profile is ``sigma_rel = sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))``,
and ``gamma`` is the largest real root of ``gamma**3 + 7 gamma**2 + (16 - sigma_rel**-2) gamma +
(12 - sigma_rel**-2)``. Unrolled, the weights of update step ``t_k`` weigh
``(t_k ** (gamma + 1) - t_(k-1) ** (gamma + 1)) / t ** (gamma + 1)`` in the average at ``t``.

Every ``snapshot_interval`` a snapshot of each average (at its last update's step) is written to
``phema-<step>-<sigma_rel>.pt``, atomically (:func:`emakit.atomic.atomic_write`): a crash leaves the
previous file or the new one. A snapshot holds every ``state_dict`` key of the model, full tensors:

* The averages are laid out for the model passed to :meth:`PostHocEMA.update` before a snapshot is
  written, so a run resumed from a state (which holds the averages but no model) writes the same
  snapshots as an uninterrupted one, also when ``update_interval`` and ``snapshot_interval`` do not
  line up. A snapshot without weights is never written: RuntimeError instead.
* Under FSDP2 (``fully_shard``) the averages are DTensor shards: :meth:`PostHocEMA.write_snapshots`
  gathers them one tensor at a time (``full_tensor()``, a collective: every rank calls it, which
  ``update`` and the Trainer do), and rank 0 writes. In a Trainer the averages are laid out for the
  sharded model at ``Event.BEFORE_LOAD``, so that a sharded checkpoint loads into them.

After training, :func:`synthesize` finds the mix of snapshots whose profile is closest, in least
squares, to the profile of any other ``sigma_rel`` at any time, and returns those weights: the inner
product of two profiles has a closed form, so the mix solves a small linear system, normalised to sum
to one. Example::

    phema = PostHocEMA(sigma_rels=(0.05, 0.10), snapshot_interval="1000ba", folder="runs/phema")
    Trainer(..., algorithms=[phema]).fit()                      # or phema.update(model) per step
    weights = synthesize("runs/phema", sigma_rel=0.08)          # {state_dict key: tensor}
    model.load_state_dict(weights)

One idea per module:

    profiles.py   the power-function profiles: sigma_rel and gamma, their inner products, the mix of snapshots
    averages.py   PostHocEMA: the averages during training, by hand (update once per optimizer step), snapshots
    synthesis.py  after training: the snapshots of a folder mixed into any sigma_rel (and `emakit posthoc`)

In emakit's Trainer, ``PostHocEMA.as_algorithm()`` (:mod:`emakit.algorithms.posthoc`) runs it at batch ends.
"""

from emakit.posthoc.averages import PostHocEMA
from emakit.posthoc.profiles import gamma_from_sigma_rel, sigma_rel_from_gamma, snapshot_coefficients
from emakit.posthoc.synthesis import add_arguments, run, snapshots_in, synthesize

__all__ = [
    "PostHocEMA",
    "add_arguments",
    "gamma_from_sigma_rel",
    "run",
    "sigma_rel_from_gamma",
    "snapshot_coefficients",
    "snapshots_in",
    "synthesize",
]
