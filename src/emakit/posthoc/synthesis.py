"""After training: the snapshots of a :class:`~emakit.posthoc.PostHocEMA` mixed into an EMA of any width.

:func:`synthesize` finds the mix of snapshots whose profile is closest, in least squares, to the profile of
any other ``sigma_rel`` at any step (:func:`emakit.posthoc.profiles.snapshot_coefficients`), and returns
those weights. ``emakit posthoc FOLDER --sigma-rel 0.08 --out ema.safetensors`` writes them.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Sequence
from pathlib import Path

import torch

from emakit.atomic import atomic_path
from emakit.posthoc.profiles import gamma_from_sigma_rel, snapshot_coefficients

__all__ = ["add_arguments", "run", "snapshots_in", "synthesize"]

_SNAPSHOT = re.compile(r"^phema-(?P<t>[0-9]+)-(?P<sigma>[0-9.]+)\.pt$")


def snapshots_in(folder: str | os.PathLike) -> list[tuple[int, float, Path]]:
    """``(step, sigma_rel, path)`` of every snapshot in ``folder``, in order of step."""
    found: list[tuple[int, float, Path]] = []
    if not Path(folder).is_dir():
        return found
    for path in Path(folder).iterdir():
        match = _SNAPSHOT.match(path.name)
        if match:
            found.append((int(match["t"]), float(match["sigma"]), path))
    return sorted(found)


def synthesize(
    folder: str | os.PathLike,
    sigma_rel: float,
    at: int | None = None,
    sources: Sequence[float] | None = None,
) -> dict[str, torch.Tensor]:
    """The weights of a power-function EMA of width ``sigma_rel`` at step ``at`` (default: the last snapshot's).

    Mixes the snapshots of ``folder`` taken at or before ``at`` (of the ``sources`` sigma_rels only,
    if given) by :func:`snapshot_coefficients`, reading one snapshot at a time: floating-point tensors
    are summed in float64 (memory: twice an fp32 model, plus one snapshot) and returned in their stored
    dtype; other tensors are taken from the latest snapshot. Keys are the model's ``state_dict``
    keys: ``model.load_state_dict(synthesize(...))``.
    """
    gamma = gamma_from_sigma_rel(sigma_rel)
    found = snapshots_in(folder)
    if at is None and found:
        at = found[-1][0]
    chosen = [(t, s, p) for t, s, p in found if 0 < t <= (at or 0) and (sources is None or s in sources)]
    if not chosen or at is None:  # at is None: no snapshots, none chosen
        raise ValueError(f"no snapshots in {str(folder)!r} at or before step {at} (sources {sources})")
    headers = [torch.load(p, map_location="cpu", weights_only=True, mmap=True) for _, _, p in chosen]  # no copy
    x = snapshot_coefficients([h["t"] for h in headers], [h["gamma"] for h in headers], at, gamma)
    del headers
    mixed: dict[str, torch.Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    for coefficient, (_, _, path) in zip(x.tolist(), chosen):  # one snapshot in memory at a time
        weights = torch.load(path, map_location="cpu", weights_only=True)["weights"]
        for key, value in weights.items():
            if not value.is_floating_point():
                mixed[key] = value.clone()  # integer tensors: the latest snapshot's
                continue
            dtypes[key] = value.dtype
            term = coefficient * value.double()
            mixed[key] = term if key not in mixed else mixed[key].add_(term)
    return {key: value.to(dtypes[key]) if key in dtypes else value for key, value in mixed.items()}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", type=Path, help="a PostHocEMA snapshot folder")
    parser.add_argument("--sigma-rel", type=float, required=True, help="the EMA's relative width, e.g. 0.08")
    parser.add_argument("--out", type=Path, required=True, help="the safetensors file to write")
    parser.add_argument("--at", type=int, default=None, help="the step to synthesize at (default: the last snapshot)")


def run(args: argparse.Namespace) -> int:
    from safetensors.torch import save_file

    try:
        weights = synthesize(args.folder, args.sigma_rel, at=args.at)
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"emakit posthoc: {error}") from None
    with atomic_path(args.out) as partial:  # the previous file stays whole until the new one is
        save_file(
            {k: v.contiguous() for k, v in weights.items()}, str(partial), metadata={"producer": "emakit posthoc"}
        )
    print(f"wrote {len(weights)} tensors of a sigma_rel={args.sigma_rel} EMA to {args.out}")
    return 0
