"""Merge saved checkpoints into one model after training: uniform, EMA-like, or WSM's decay-emulating weights.

``merged = sum_k c_k * theta_k`` over checkpoints ``theta_1 .. theta_K`` (oldest first), in float64, written in each
tensor's own dtype. The coefficients ``c_k`` (they sum to 1):

``uniform``
    ``c_k = 1 / K``: the average of the checkpoints (SWA of saved weights; "model soup" of one run).
``ema:H``
    what an EMA of half-life ``H`` would hold had it been updated at each checkpoint only: ``m_1 = theta_1``,
    ``m_k = s_k m_(k-1) + (1 - s_k) theta_k`` with ``s_k = 2 ** (-(t_k - t_(k-1)) / H)``. ``H`` in optimizer steps
    (``"500ba"``: each checkpoint's step ``t_k`` must be known: emakit, Lightning and Hugging Face checkpoints say
    it) or a bare number, counted in checkpoints (``t_k = k``).
``wsm:DECAY``
    WSM (Tian et al. 2025, "Decay-free learning rate schedule via checkpoint merging"): merging checkpoints of a
    constant-learning-rate run emulates a learning-rate decay over them. With ``k = K - 1`` steps between the
    first checkpoint (the merge's base) and the last, and a decay ``d`` from ``d(0) = 1`` towards 0 over the window,
    the gradient of step ``i`` weighs ``w_i = d((i - 1) / k)`` (``w_(k+1) = 0``), so that ``c_1 = 1 - w_1 = 0`` and
    ``c_(i+1) = w_i - w_(i+1)``. ``DECAY`` is ``linear`` (``d(x) = 1 - x``: the uniform average of
    all but the first), ``cosine`` (``(1 + cos(pi x)) / 2``) or ``1-sqrt`` (``1 - sqrt(x)``).
``0.2,0.3,0.5``
    given coefficients, one per checkpoint, summing to 1.

Checkpoints are read one at a time (:mod:`emakit.merging.readers`: emakit, Lightning, Hugging Face, accelerate, DCP,
safetensors and ``torch.save`` files): memory is a float64 accumulator (twice an fp32 model) plus one tensor being
read. Every checkpoint must hold the same tensors with the same shapes as the first (checked on their headers before
any data is read: a mismatch names the tensor and both checkpoints). Tensors that are not floating point (step
counters, integer buffers) are taken from the last checkpoint.

Example::

    import emakit
    weights = emakit.merge(["ckpt/checkpoint-800", "ckpt/checkpoint-900", "ckpt/checkpoint-1000"], "uniform")
    model.load_state_dict(weights)

    emakit merge ckpt/checkpoint-* --weights wsm:1-sqrt --out merged/      # a from_pretrained folder
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch

from emakit.atomic import atomic_path
from emakit.merging.readers import Checkpoint, open_checkpoint

__all__ = ["add_arguments", "coefficients", "merge", "open_checkpoint", "run"]

DECAYS = {
    "linear": lambda x: 1.0 - x,
    "cosine": lambda x: (1.0 + math.cos(math.pi * x)) / 2.0,
    "1-sqrt": lambda x: 1.0 - math.sqrt(x),
}
# what a from_pretrained folder holds besides the weights, copied from the newest Hugging Face input
_CONFIG_FILES = re.compile(
    r"^(config|generation_config|tokenizer_config|special_tokens_map|tokenizer|preprocessor_config|chat_template)"
    r"\.(json|jinja)$|^(vocab\.(json|txt)|merges\.txt|tokenizer\.model|spiece\.model)$"
)


def coefficients(weights: str, steps: Sequence[int | None]) -> list[float]:
    """The merge coefficients of ``weights`` (see the module) for checkpoints at ``steps`` (None: unknown), oldest
    first. ValueError names a bad spelling, steps that are unknown or not increasing where needed.

    Example::

        >>> coefficients("ema:1", [None, None, None])     # half-life of one checkpoint
        [0.25, 0.25, 0.5]
        >>> coefficients("wsm:linear", [100, 200, 300])
        [0.0, 0.5, 0.5]
    """
    count = len(steps)
    if count < 1:
        raise ValueError("merge needs at least one checkpoint")
    if weights == "uniform":
        return [1.0 / count] * count
    if weights.startswith("ema:"):
        return _ema(weights, steps)
    if weights.startswith("wsm:"):
        decay = DECAYS.get(weights[4:])
        if decay is None:
            raise ValueError(f"weights={weights!r}: the WSM decay must be one of {sorted(DECAYS)}")
        if count < 2:
            raise ValueError(f"weights={weights!r} needs at least 2 checkpoints: the base and a later one")
        known = [s for s in steps if s is not None]
        if len(known) == count:
            _check_increasing(known, weights)
        k = count - 1
        w = [decay((i - 1) / k) for i in range(1, k + 1)] + [0.0]  # w_1 .. w_k, then 0
        return [1.0 - w[0]] + [w[j - 1] - w[j] for j in range(1, k + 1)]
    try:
        given = [float(x) for x in weights.split(",")]
    except ValueError:
        raise ValueError(
            f"weights={weights!r}: expected 'uniform', 'ema:HALF_LIFE', 'wsm:{'|'.join(DECAYS)}' or one number per "
            "checkpoint separated by commas"
        ) from None
    if len(given) != count or not math.isclose(sum(given), 1.0, abs_tol=1e-9) or min(given) < 0:
        raise ValueError(f"weights={weights!r}: give {count} coefficients (one per checkpoint), >= 0, summing to 1")
    return given


def _ema(weights: str, steps: Sequence[int | None]) -> list[float]:
    spelled = weights[4:]
    if spelled.endswith("ba"):
        known = [s for s in steps if s is not None]
        if len(known) != len(steps):
            raise ValueError(
                f"weights={weights!r} counts optimizer steps, but checkpoints "
                f"{[i for i, s in enumerate(steps) if s is None]} do not say theirs: give the half-life in "
                "checkpoints (a bare number, e.g. 'ema:2')"
            )
        times, half_life = [float(s) for s in known], _positive(spelled[:-2], weights)
    else:
        times, half_life = [float(k) for k in range(1, len(steps) + 1)], _positive(spelled, weights)
    _check_increasing(times, weights)
    result = [1.0]
    for previous, now in itertools.pairwise(times):
        smoothing = 2.0 ** (-(now - previous) / half_life)
        result = [c * smoothing for c in result] + [1.0 - smoothing]
    return result


def _check_increasing(steps: Sequence[float], weights: str) -> None:
    if any(b <= a for a, b in itertools.pairwise(steps)):
        raise ValueError(
            f"weights={weights!r}: the checkpoints' steps {list(steps)} must increase: list them oldest first"
        )


def _positive(text: str, weights: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ValueError(f"weights={weights!r}: the half-life must be a number > 0, optionally in 'ba' ('ema:500ba')")
    return value


def _check_same_tensors(checkpoints: Sequence[Checkpoint]) -> None:
    first = checkpoints[0]
    for other in checkpoints[1:]:
        for name, spec in first.specs.items():
            if name not in other.specs:
                raise ValueError(
                    f"checkpoint {str(other.path)!r} has no tensor {name!r}, which {str(first.path)!r} has"
                )
            if other.specs[name].shape != spec.shape:
                raise ValueError(
                    f"tensor {name!r} has shape {list(other.specs[name].shape)} in {str(other.path)!r} but "
                    f"{list(spec.shape)} in {str(first.path)!r}"
                )
        extra = sorted(set(other.specs) - set(first.specs))
        if extra:
            raise ValueError(
                f"checkpoint {str(other.path)!r} has tensor {extra[0]!r}, which {str(first.path)!r} has not"
            )


def merge(
    checkpoints: Sequence[str | os.PathLike],
    weights: str | Sequence[float] = "uniform",
    prefix: str = "",
    trust: bool = False,
) -> dict[str, torch.Tensor]:
    """``sum_k c_k * theta_k`` of the checkpoints' model weights (see the module), keyed like their state_dicts.

    ``checkpoints``: oldest first. ``weights``: a scheme (``"uniform"``, ``"ema:500ba"``, ``"wsm:cosine"``) or one
    coefficient per checkpoint. ``prefix``: keep only the tensors whose names start with it, without it (a
    LightningModule's ``"model."``, to load into the plain model). ``trust``: load pickled objects (see
    :func:`~emakit.merging.readers.open_checkpoint`).
    """
    opened = [open_checkpoint(path, trust=trust) for path in checkpoints]
    if not opened:
        raise ValueError("merge needs at least one checkpoint")
    if prefix:
        for checkpoint in opened:
            checkpoint.specs = {n[len(prefix) :]: s for n, s in checkpoint.specs.items() if n.startswith(prefix)}
            if not checkpoint.specs:
                raise ValueError(f"checkpoint {str(checkpoint.path)!r} has no tensor named {prefix!r}...")
    _check_same_tensors(opened)
    if isinstance(weights, str):
        c = coefficients(weights, [checkpoint.step for checkpoint in opened])
    else:
        c = coefficients(",".join(map(repr, weights)), [None] * len(opened))
    sums: dict[str, torch.Tensor] = {}
    for coefficient, checkpoint in zip(c, opened):  # one checkpoint at a time, one tensor at a time
        last = checkpoint is opened[-1]
        for name, spec in checkpoint.specs.items():
            if not spec.dtype.is_floating_point:
                if last:
                    sums[name] = checkpoint.read(prefix + name).clone()
                continue
            term = checkpoint.read(prefix + name).to(torch.float64).mul_(coefficient)
            sums[name] = term if name not in sums else sums[name].add_(term)
    dtypes = {name: spec.dtype for name, spec in opened[-1].specs.items()}
    return {name: sums[name].to(dtypes[name]) for name in opened[0].specs}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoints", nargs="+", type=Path, help="checkpoints (files or folders), oldest first")
    parser.add_argument(
        "--weights", default="uniform", help="uniform (default), ema:HALF_LIFE ('500ba' or in checkpoints), "
        f"wsm:{'|'.join(DECAYS)}, or one coefficient per checkpoint ('0.2,0.3,0.5')",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, required=True, help="a .safetensors file, or a folder (from_pretrained)")
    parser.add_argument("--prefix", default="", help="keep tensors named PREFIX..., without it (Lightning: 'model.')")
    parser.add_argument("--trust-pickle", action="store_true", help="load checkpoints holding pickled objects")


def run(args: argparse.Namespace) -> int:
    from safetensors.torch import save_file

    try:
        weights = merge(args.checkpoints, args.weights, prefix=args.prefix, trust=args.trust_pickle)
        folder = None
        if args.out.suffix != ".safetensors":
            folder = open_checkpoint(args.checkpoints[-1], trust=args.trust_pickle).folder
            if folder is None:
                raise ValueError(
                    f"--out {str(args.out)!r} is a folder, but the newest checkpoint has no config.json to make it a "
                    "from_pretrained folder: give a .safetensors path"
                )
    except ValueError as error:
        raise SystemExit(f"emakit merge: {error}") from None
    tensors = {name: value.contiguous() for name, value in weights.items()}
    metadata = {"format": "pt", "producer": "emakit merge", "weights": args.weights}
    target = args.out if folder is None else args.out / "model.safetensors"
    if folder is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        for source in folder.iterdir():
            if _CONFIG_FILES.match(source.name):
                shutil.copy2(source, args.out / source.name)
    with atomic_path(target) as partial:
        save_file(tensors, str(partial), metadata=metadata)
    print(f"merged {len(args.checkpoints)} checkpoints ({args.weights}) into {len(tensors)} tensors: {target}")
    return 0
