"""A model with an EMA attached behaves exactly like one without, for the user and for every library.

Each test builds a model of a *kind* (:data:`KINDS`) and a *variant* of it, then pins what the variant does against
a plain model (no emakit anywhere) holding the same values: the *reference*. Variants:

- ``plain``: no EMA. The reference's twin: checks the tests' own logic against plain PyTorch.
- ``ema``: a default ``EMA(smoothing=0.9)`` attached, updated after each of two optimizer steps. Its reference is
  a twin built from the same seed and trained with the same steps, without an EMA.
- ``flat``: the same with ``EMA(smoothing=0.9, flatten_model=True)``.
- ``ema_model``: ``ema.ema_model`` (of the ``ema`` variant); its reference is a plain model loaded with its values.
- ``ema_weights``: the model inside ``with ema.ema_weights(model):``; its reference is a plain model loaded with the
  values it holds there. On leaving, the model must hold the twin's training weights again, bit for bit.

``flatten_model=True`` re-points the model's tensors (into one flat buffer per dtype, each tensor keeping a storage
of its own bytes only), so it is *not claimed* for: ZeRO bucket views, ``share_memory()``, and raw pointers (numpy
views, ``data_ptr()``) captured before the first update. Those cases run only the default mode; the rest run both.

Sizes compare within 1% + 1 KiB of the reference's (:func:`close_size`); values compare bit for bit (:func:`bits`).
"""

from __future__ import annotations

import contextlib
import copy
import gc
import io
import pickle
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from accelerate import Accelerator
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn
from torchrun import torchrun
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.utils import logging as transformers_logging

from emakit import EMA

transformers_logging.set_verbosity_error()
transformers_logging.disable_progress_bar()

KINDS = ["mlp", "bn_cnn", "channels_last_cnn", "gpt2", "lstm"]
BN_KINDS = ["bn_cnn", "channels_last_cnn"]
VARIANTS = ["plain", "ema", "flat", "ema_model", "ema_weights"]
# Raw pointers (numpy, DLPack) keep viewing a weight's memory across swaps in the default mode. flatten_model swaps
# by exchanging storage pointers, so raw pointers are outside its contract (README); "plain" swaps with a block that
# does nothing, checking the tests' logic.
POINTER_VARIANTS = ["plain", "ema"]
SMOOTHING = 0.9
STEPS = 2
ZERO_SCRIPT = Path(__file__).with_name("ecosystem_zero_script.py")


# ----------------------------------------------------------------------------------------------------- models
class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.Tanh())
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )  # fmt: skip
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))


class LSTMNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(6, 32, batch_first=True)
        self.fc = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return self.fc(out[:, -1])


def gpt2_config() -> GPT2Config:
    return GPT2Config(
        n_layer=2, n_head=2, n_embd=32, vocab_size=100, n_positions=32,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=99, eos_token_id=99,
    )  # fmt: skip


def build(kind: str) -> nn.Module:
    """A freshly initialised plain model of ``kind``: the same values on every call."""
    torch.manual_seed(0)
    if kind == "mlp":
        return MLP()
    if kind == "bn_cnn":
        return CNN()
    if kind == "channels_last_cnn":
        return CNN().to(memory_format=torch.channels_last)
    if kind == "gpt2":
        return GPT2LMHeadModel(gpt2_config())  # lm_head.weight is transformer.wte.weight
    if kind == "lstm":
        return LSTMNet()
    raise ValueError(kind)


def example_input(kind: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    if kind == "mlp":
        return torch.randn(4, 32, generator=generator)
    if kind in BN_KINDS:
        x = torch.randn(4, 3, 8, 8, generator=generator)
        return x.to(memory_format=torch.channels_last) if kind == "channels_last_cnn" else x
    if kind == "gpt2":
        return torch.randint(0, 100, (2, 8), generator=generator)
    if kind == "lstm":
        return torch.randn(4, 5, 6, generator=generator)
    raise ValueError(kind)


def loss_of(kind: str, model: nn.Module) -> torch.Tensor:
    x = example_input(kind)
    if kind == "gpt2":
        return model(input_ids=x, labels=x).loss
    return model(x).square().mean()


def last_weight(model: nn.Module) -> nn.Parameter:
    """The last layer's weight (GPT-2: ``lm_head.weight``, tied to the token embedding)."""
    return model.lm_head.weight if isinstance(model, GPT2LMHeadModel) else model.fc.weight


def names_of(model: nn.Module, tensor: torch.Tensor) -> list[str]:
    """Every state_dict key of ``model`` that is ``tensor`` (several where weights are tied)."""
    return [name for name, t in model.state_dict(keep_vars=True).items() if t is tensor]


def train(kind: str, model: nn.Module, ema: EMA | None) -> tuple[torch.optim.Optimizer, list[dict]]:
    """``STEPS`` SGD steps (``ema.update(model)`` after each); returns the optimizer and the parameters after each."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    history = []
    for _ in range(STEPS):
        optimizer.zero_grad()
        loss_of(kind, model).backward()
        optimizer.step()
        if ema is not None:
            ema.update(model)
        history.append({name: p.detach().clone() for name, p in model.named_parameters()})
    return optimizer, history


# ---------------------------------------------------------------------------------------------------- checks
def bits(t: torch.Tensor) -> torch.Tensor:
    """The bytes of ``t``'s values, in logical order: equal bits, not just equal numbers (-0.0, NaN)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def assert_same(actual: Any, expected: Any, what: str = "") -> None:
    """Equal nested structures, tensors bit for bit (and of the same dtype and shape)."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), what
        assert (actual.dtype, actual.shape) == (expected.dtype, expected.shape), what
        assert torch.equal(bits(actual), bits(expected)), f"{what}: values differ"
    elif isinstance(expected, dict):
        assert isinstance(actual, dict) and list(actual) == list(expected), f"{what}: keys {list(actual)}"
        for key in expected:
            assert_same(actual[key], expected[key], f"{what}[{key!r}]")
    elif isinstance(expected, list | tuple):
        assert type(actual) is type(expected) and len(actual) == len(expected), what
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_same(a, e, f"{what}[{i}]")
    else:
        assert actual == expected, what


def snapshot(value: Any) -> Any:
    """A deep copy of nested containers, tensors cloned."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: snapshot(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(snapshot(v) for v in value)
    return copy.deepcopy(value)


def close_size(actual: int, expected: int) -> bool:
    return abs(actual - expected) <= 0.01 * expected + 1024


def alias_groups(state: dict[str, torch.Tensor]) -> list[list[str]]:
    """The keys that share memory (one storage), as libraries see it: tied weights, views of one buffer."""
    by_storage: dict[int, list[str]] = {}
    for name, t in state.items():
        by_storage.setdefault(t.untyped_storage().data_ptr(), []).append(name)
    return sorted(sorted(names) for names in by_storage.values() if len(names) > 1)


def pointers(model: nn.Module) -> dict[str, int]:
    return {name: t.data_ptr() for name, t in model.state_dict().items()}


def saved(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def loaded(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), weights_only=True)


def reachable_storage_bytes(root: object) -> int:
    """Bytes of the distinct storages reachable from ``root`` (attributes, containers, hooks, closures).

    Stops at classes and modules (not at instances' hooks or bound methods): whatever an object drags along when
    copied or pickled, such as an EMA referenced from a hook, counts.
    """
    seen: set[int] = set()
    storages: dict[int, int] = {}
    stack = [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, type | types.ModuleType | str | bytes | int | float | bool):
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = max(storages.get(storage.data_ptr(), 0), storage.nbytes())
            stack.extend(v for v in (obj.grad, getattr(obj, "__dict__", None)) if v is not None)
        elif isinstance(obj, types.FunctionType):  # its closure and defaults, not its module's globals
            stack.extend(c.cell_contents for c in obj.__closure__ or () if c.cell_contents is not None)
            stack.extend(v for v in (obj.__defaults__, obj.__kwdefaults__, obj.__dict__) if v is not None)
        elif isinstance(obj, types.BuiltinFunctionType):
            stack.append(obj.__self__)
        else:
            stack.extend(gc.get_referents(obj))
    storages.pop(0, None)  # empty storages
    return sum(storages.values())


# -------------------------------------------------------------------------------------------------- variants
@dataclass
class Case:
    kind: str
    variant: str
    model: nn.Module  # what the test exercises
    reference: nn.Module  # a plain model (no emakit) holding the same values
    training: dict[str, torch.Tensor]  # what a plain twin holds after the same training steps
    history: list[dict[str, torch.Tensor]]  # the twin's parameters after each step
    ema: EMA | None = None
    optimizer: torch.optim.Optimizer | None = None
    pointers_before_update: dict[str, int] = field(default_factory=dict)  # before the first ema.update
    keep: list[Any] = field(default_factory=list)  # objects kept alive for the test's duration


def plain_holding(kind: str, values: dict[str, torch.Tensor]) -> nn.Module:
    reference = build(kind)
    reference.load_state_dict(snapshot(values))
    return reference


@contextlib.contextmanager
def variant(kind: str, name: str) -> Iterator[Case]:
    """Build ``name`` of ``kind`` with its reference; for ``ema_weights`` the body runs inside the swap, and leaving
    it (without an exception) asserts the model holds its training weights again, bit for bit."""
    twin = build(kind)
    _, history = train(kind, twin, None)
    training = snapshot(twin.state_dict())
    model = build(kind)
    before = pointers(model)
    if name == "plain":
        optimizer, _ = train(kind, model, None)
        yield Case(kind, name, model, twin, training, history, optimizer=optimizer, pointers_before_update=before)
        return
    ema = EMA(smoothing=SMOOTHING, flatten_model=True) if name == "flat" else EMA(smoothing=SMOOTHING)
    optimizer, _ = train(kind, model, ema)
    if name in ("ema", "flat"):
        yield Case(kind, name, model, twin, training, history, ema, optimizer, before)
    elif name == "ema_model":
        average = ema.ema_model
        assert average is not model and type(average) is type(model)
        reference = plain_holding(kind, average.state_dict())
        yield Case(kind, name, average, reference, training, history, ema, optimizer, keep=[model])
    elif name == "ema_weights":
        with ema.ema_weights(model):
            reference = plain_holding(kind, model.state_dict())
            yield Case(kind, name, model, reference, training, history, ema, optimizer)
        assert_same(model.state_dict(), training, "training weights after ema_weights")
    else:
        raise ValueError(name)


def swap(case: Case) -> contextlib.AbstractContextManager:
    """``ema.ema_weights(model)``; for the plain model, a block that does nothing (what the test expects)."""
    return contextlib.nullcontext() if case.ema is None else case.ema.ema_weights(case.model)


def assert_write_inside_swap_is_not_silent(case: Case, write: Callable[[], None], names: list[str]) -> None:
    """``write`` writes into the model inside ``ema_weights``: leaving raises naming one of ``names``, or the
    average is bit for bit what it was."""
    average = snapshot(case.ema.state_dict())
    finished = False
    try:
        with case.ema.ema_weights(case.model):
            write()
            finished = True
    except Exception as error:
        if not finished:
            raise
        assert any(name in str(error) for name in names), f"leaving raised without naming any of {names}: {error}"
    else:
        assert_same(case.ema.state_dict(), average, "the average after an in-place write inside ema_weights")


kinds = pytest.mark.parametrize("kind", KINDS)
variants = pytest.mark.parametrize("name", VARIANTS)


# --------------------------------------------------------------------------------- what libraries look at
@kinds
@variants
def test_tensors_look_like_the_plain_models(kind, name):
    """Keys, values, shapes, strides, storage sizes and aliasing: what every library reads off a state_dict."""
    with variant(kind, name) as case:
        state, expected = case.model.state_dict(), case.reference.state_dict()
        assert_same(state, expected, "state_dict")
        for key, t in state.items():
            e = expected[key]
            assert t.stride() == e.stride(), key
            assert t.untyped_storage().nbytes() == e.untyped_storage().nbytes(), f"{key}: storage holds more"
            assert t.storage_offset() == e.storage_offset(), key
        assert alias_groups(state) == alias_groups(expected)


@kinds
@pytest.mark.parametrize("name", ["ema_model", "ema_weights"])
def test_the_average_variants_hold_the_average(kind, name):
    """Not the training weights: else every test of these variants would check the training model again."""
    with variant(kind, name) as case:
        expected = {k: v.double() for k, v in case.history[0].items()}
        for step in case.history[1:]:
            expected = {k: SMOOTHING * v + (1 - SMOOTHING) * step[k].double() for k, v in expected.items()}
        held = dict(case.model.named_parameters())
        assert held.keys() == expected.keys()
        for key, value in expected.items():
            torch.testing.assert_close(held[key].detach().double(), value, rtol=1e-5, atol=1e-6, msg=key)
        assert any(not torch.equal(held[k], case.training[k]) for k in held), "holds the training weights"


@kinds
@variants
def test_torch_save_writes_only_the_models_bytes_and_loads_back(kind, name):
    with variant(kind, name) as case:
        data, expected = saved(case.model.state_dict()), saved(case.reference.state_dict())
        assert close_size(len(data), len(expected)), (len(data), len(expected))
        assert_same(loaded(data), case.reference.state_dict(), "loaded state_dict")
        assert alias_groups(loaded(data)) == alias_groups(loaded(expected))
        # one tensor: a view of a bigger buffer would write the whole buffer
        one, one_expected = saved(last_weight(case.model)), saved(last_weight(case.reference))
        assert close_size(len(one), len(one_expected)), (len(one), len(one_expected))
        assert_same(loaded(one), last_weight(case.reference).detach(), "loaded tensor")


def outcome(action: Callable[[], Any]) -> tuple[str, Any]:
    try:
        return "ok", action()
    except Exception as error:
        return "raised", type(error)


@kinds
@variants
def test_safetensors_files_are_the_plain_models_and_load_back(kind, name, tmp_path):
    with variant(kind, name) as case:
        # save_file: what the plain model gets, the same bytes or the same error (tied GPT-2 weights share memory;
        # channels_last weights are not contiguous)
        def save_file_of(model: nn.Module, path: Path) -> bytes:
            save_file(model.state_dict(), path)
            return path.read_bytes()

        got = outcome(lambda: save_file_of(case.model, tmp_path / "variant-file.safetensors"))
        assert got == outcome(lambda: save_file_of(case.reference, tmp_path / "reference-file.safetensors"))

        save_model(case.model, tmp_path / "variant.safetensors")
        save_model(case.reference, tmp_path / "reference.safetensors")
        assert (tmp_path / "variant.safetensors").read_bytes() == (tmp_path / "reference.safetensors").read_bytes()
        fresh = build(kind)
        assert load_model(fresh, tmp_path / "variant.safetensors") == (set(), [])
        assert_same(fresh.state_dict(), case.reference.state_dict(), "loaded into a fresh model")
        if name != "ema_weights":  # loading into the variant itself (inside ema_weights it would be a write there)
            other = plain_holding(kind, {k: v + 1 if v.is_floating_point() else v for k, v in case.training.items()})
            save_model(other, tmp_path / "other.safetensors")
            assert load_model(case.model, tmp_path / "other.safetensors") == (set(), [])
            assert_same(case.model.state_dict(), other.state_dict(), "loaded into the variant")


@pytest.mark.parametrize("name", VARIANTS)
def test_transformers_save_pretrained_round_trip(name, tmp_path):
    with variant("gpt2", name) as case:
        case.model.save_pretrained(tmp_path / "variant")
        case.reference.save_pretrained(tmp_path / "reference")
        for file in ("model.safetensors", "config.json"):
            assert (tmp_path / "variant" / file).read_bytes() == (tmp_path / "reference" / file).read_bytes(), file
        back = GPT2LMHeadModel.from_pretrained(tmp_path / "variant")
        assert_same(back.state_dict(), case.reference.state_dict(), "from_pretrained")
        assert back.lm_head.weight is back.transformer.wte.weight


@kinds
@variants
def test_accelerate_save_model_and_state_round_trip(kind, name, tmp_path):
    with variant(kind, name) as case:
        accelerator = Accelerator(cpu=True)
        model, _ = accelerator.prepare(case.model, torch.optim.SGD(case.model.parameters(), lr=0.1))
        accelerator.save_model(model, tmp_path / "model")
        accelerator.save_model(case.reference, tmp_path / "reference")
        # every tensor: the plain model's keys (tied duplicates dropped alike), with its values
        written = load_file(tmp_path / "model" / "model.safetensors")
        expected = load_file(tmp_path / "reference" / "model.safetensors")
        assert sorted(written) == sorted(expected)
        assert set(written) <= set(case.reference.state_dict())
        for key, value in written.items():
            assert_same(value, case.reference.state_dict()[key], key)

        accelerator.save_state(tmp_path / "state")
        in_state = load_file(tmp_path / "state" / "model.safetensors")
        assert sorted(in_state) == sorted(expected)
        for key, value in in_state.items():
            assert_same(value, case.reference.state_dict()[key], key)
        if name == "ema_weights":  # load_state would write into the model inside the swap
            return
        values = snapshot(model.state_dict())
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        accelerator.load_state(tmp_path / "state")
        assert_same(model.state_dict(), values, "after load_state")


@kinds
@variants
def test_deepcopy_copies_the_values_and_only_the_models_bytes(kind, name):
    with variant(kind, name) as case:
        clone, expected = copy.deepcopy(case.model), copy.deepcopy(case.reference)
        assert type(clone) is type(expected)
        assert_same(clone.state_dict(), case.reference.state_dict(), "deepcopy")
        assert alias_groups(clone.state_dict()) == alias_groups(expected.state_dict())
        size, expected_size = reachable_storage_bytes(clone), reachable_storage_bytes(expected)
        assert close_size(size, expected_size), (size, expected_size)
        values = snapshot(case.model.state_dict())
        with torch.no_grad():
            last_weight(clone).add_(1.0)
        assert_same(case.model.state_dict(), values, "the original after writing into the copy")


@kinds
@variants
def test_pickle_round_trip(kind, name):
    with variant(kind, name) as case:
        data, expected = pickle.dumps(case.model), pickle.dumps(case.reference)
        assert close_size(len(data), len(expected)), (len(data), len(expected))
        back = pickle.loads(data)
        assert type(back) is type(case.reference)
        assert_same(back.state_dict(), case.reference.state_dict(), "unpickled")
        assert alias_groups(back.state_dict()) == alias_groups(pickle.loads(expected).state_dict())


# ------------------------------------------------------------------------------------- shared memory
def _write_into(tensor: torch.Tensor, value: torch.Tensor) -> None:
    with torch.no_grad():
        tensor.copy_(value)


def write_in_worker(tensor: torch.Tensor, value: torch.Tensor) -> None:
    """A forked worker process writes ``value`` into ``tensor`` in place."""
    process = mp.get_context("fork").Process(target=_write_into, args=(tensor, value))
    process.start()
    process.join(timeout=60)
    assert process.exitcode == 0, f"worker exit code {process.exitcode}"


@pytest.mark.skipif("fork" not in mp.get_all_start_methods(), reason="needs the fork start method")
@kinds
@pytest.mark.parametrize("name", ["plain", "ema", "ema_model", "ema_weights"])  # flatten_model: not claimed
def test_share_memory_then_a_worker_writes_a_parameter(kind, name):
    if name == "ema_weights":  # share and write inside the swap: a write there must not be silent
        with variant(kind, "ema") as case:

            def share_and_write() -> None:
                case.model.share_memory()
                weight = last_weight(case.model)
                value = weight.detach() + 1.0
                write_in_worker(weight, value)
                assert_same(weight, value, "the parent's parameter")

            assert_write_inside_swap_is_not_silent(case, share_and_write, names_of(case.model, last_weight(case.model)))
        return
    with variant(kind, name) as case:
        case.model.share_memory()
        weight = last_weight(case.model)
        value = weight.detach() + 1.0
        average = snapshot(last_weight(case.ema.ema_model)) if name == "ema" else None
        write_in_worker(weight, value)
        assert_same(weight, value, "the parent's parameter")
        if name == "ema":  # the average reads the parameter where it lives now
            case.ema.update(case.model)
            torch.testing.assert_close(
                last_weight(case.ema.ema_model).detach(), SMOOTHING * average + (1 - SMOOTHING) * value
            )


# -------------------------------------------------------------------------------- swaps: views and pointers
@kinds
@pytest.mark.parametrize("name", POINTER_VARIANTS)
def test_numpy_view_taken_before_a_swap(kind, name):
    with variant(kind, name) as case:
        view = last_weight(case.model).detach().numpy()
        with swap(case):
            assert np.array_equal(view, last_weight(case.model).detach().numpy()), "the view shows other memory"
        key = names_of(case.model, last_weight(case.model))[0]
        assert np.array_equal(view, case.training[key].numpy())
        with torch.no_grad():
            last_weight(case.model).add_(1.0)
        assert np.array_equal(view, case.training[key].numpy() + np.float32(1.0))


@kinds
@pytest.mark.parametrize("name", POINTER_VARIANTS)
def test_numpy_view_taken_inside_a_swap(kind, name):
    with variant(kind, name) as case:
        with swap(case):
            view = last_weight(case.model).detach().numpy()
        key = names_of(case.model, last_weight(case.model))[0]
        assert np.array_equal(view, case.training[key].numpy()), "the view no longer shows the weight's memory"
        with torch.no_grad():
            last_weight(case.model).add_(1.0)
        assert np.array_equal(view, last_weight(case.model).detach().numpy())


@kinds
@pytest.mark.parametrize("name", POINTER_VARIANTS)
def test_data_pointers_stay_put(kind, name):
    with variant(kind, name) as case:
        now = pointers(case.model)
        if name != "flat":  # flatten_model re-points the tensors at the first update: not claimed
            assert now == case.pointers_before_update, "the EMA re-pointed the model's tensors"
        with swap(case):
            assert pointers(case.model) == now, "ema_weights re-pointed the model's tensors"
        assert pointers(case.model) == now


# ------------------------------------------------------------------------------------------ swaps: safety
@kinds
@pytest.mark.parametrize("name", ["ema", "flat"])  # both modes claim swap safety
def test_backward_after_leaving_ema_weights_raises(kind, name):
    """The graph saw the average; backward after exit would give gradients of weights the model no longer holds."""
    with variant(kind, name) as case:
        case.model.eval()
        with swap(case):
            loss = loss_of(kind, case.model)
        with pytest.raises(RuntimeError):
            loss.backward()
        assert_same(case.model.state_dict(), case.training, "training weights")


@kinds
@pytest.mark.parametrize("name", ["ema", "flat"])  # both modes claim swap safety
def test_backward_inside_ema_weights_of_a_forward_before_raises(kind, name):
    with variant(kind, name) as case:
        case.model.eval()
        loss = loss_of(kind, case.model)
        with swap(case), pytest.raises(RuntimeError):
            loss.backward()
        assert_same(case.model.state_dict(), case.training, "training weights")


@pytest.mark.parametrize("kind", BN_KINDS)
@pytest.mark.parametrize("name", ["ema", "flat"])  # both modes claim swap safety
def test_train_mode_forward_inside_ema_weights_changes_neither_weights_nor_average(kind, name):
    """A forgotten ``model.eval()``: BatchNorm writes its running statistics while the average is in the model."""
    with variant(kind, name) as case:
        average = snapshot(case.ema.state_dict())
        with swap(case), torch.no_grad():
            case.model.train()
            loss_of(kind, case.model)
        assert_same(case.model.state_dict(), case.training, "training weights and buffers")
        assert_same(case.ema.state_dict(), average, "the average")


@kinds
@pytest.mark.parametrize(
    ("name", "write"),
    [
        *[("ema", write) for write in ("optimizer_step", "no_grad_add", "data_add")],
        # flatten_model swaps by exchanging storage pointers (O(1)) and sees writes through autograd's version
        # counters: a write through .data is outside its contract (README) where torch has the pointer exchange.
        *[("flat", write) for write in ("optimizer_step", "no_grad_add")],
        *([] if hasattr(torch.UntypedStorage, "_swap_data_ptr_") else [("flat", "data_add")]),
    ],
)
def test_an_inplace_write_inside_ema_weights_is_never_silent(kind, name, write):
    with variant(kind, name) as case:
        model, weight = case.model, last_weight(case.model)

        def step() -> None:
            case.optimizer.zero_grad()
            loss_of(kind, model).backward()
            case.optimizer.step()

        def no_grad_add() -> None:
            with torch.no_grad():
                weight.add_(1.0)

        def data_add() -> None:  # .data: a write autograd's version counter does not see
            weight.data.add_(1.0)

        actions = {"optimizer_step": step, "no_grad_add": no_grad_add, "data_add": data_add}
        names = [n for n, _ in model.named_parameters()] if write == "optimizer_step" else names_of(model, weight)
        assert_write_inside_swap_is_not_silent(case, actions[write], names)


# -------------------------------------------------------------------------------------------- distributed
def test_zero_bucket_views_under_ddp_keep_ranks_identical_and_equal_to_no_ema(tmp_path):
    """ZeroRedundancyOptimizer(parameters_as_bucket_view=True), 2 ranks on gloo; default EMA only (flatten_model
    re-points the tensors out of ZeRO's buckets: not claimed)."""
    result = torchrun(ZERO_SCRIPT, str(tmp_path), timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    runs = {
        mode: [torch.load(tmp_path / f"{mode}-rank{rank}.pt", weights_only=True) for rank in (0, 1)]
        for mode in ("none", "ema")
    }
    reference = runs["none"][0]["weights"]
    assert_same(runs["none"][1]["weights"], reference, "rank 1 without EMA")
    assert_same(runs["ema"][0]["weights"], reference, "rank 0 with EMA")
    assert_same(runs["ema"][1]["weights"], reference, "rank 1 with EMA")
    assert_same(runs["ema"][1]["average"], runs["ema"][0]["average"], "the ranks' averages")
