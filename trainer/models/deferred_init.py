"""A model's seeded initial weights, one tensor at a time, without ever holding the whole model.

Building a model in full to shard it costs one fp32 copy on some rank (280 GB of host memory for a 70B model)
while the others wait. Instead, every rank builds the model on the meta device while `record` notes each
operation that writes a tensor (the modules' constructors and the family's weight init: `uniform_`,
`normal_`, `fill_`, copies, constants); `replay` then runs those operations on real tensors, in the same
order and from the same seed, and hands each parameter and buffer to the caller as soon as its last write is
done, so that the caller keeps its shard and the rest is freed. The random generator draws exactly what the
full build draws (a write whose result is overwritten before anything reads it runs on a scratch tensor of
the same layout), so the weights are bit for bit the full build's, on every rank, with no communication;
the peak is about one parameter in full, whatever the model's size.

This is torchdistx's deferred init, reduced to what a model's construction does. A model whose construction
cannot be recorded (its code reads a value back from a tensor, or a tensor comes from outside torch's
operators) raises `NotRecordable`; the caller then builds the model in full (trainer/parallel/model_source.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

from trainer.errors import UserError

_OVERWRITING = ("uniform", "normal", "fill", "zero", "copy", "random", "bernoulli", "exponential", "geometric",
                "cauchy", "log_normal")  # fmt: skip
OVERWRITING_OPS = frozenset(
    f"aten.{base}_.{overload}"
    for base in _OVERWRITING
    for overload in ("default", "Tensor", "Scalar", "float", "from", "to")
)
"""In-place operations whose result does not depend on the values they overwrite (first argument)."""


class NotRecordable(RuntimeError):
    """The model's construction did something a replay could not repeat."""


def _key(tensor: torch.Tensor) -> int:
    """The identity of a tensor's memory: the same for every view of it."""
    return tensor.untyped_storage()._cdata


@dataclass(frozen=True)
class _Ref:
    """A recorded meta tensor: a view (size, stride, offset) of one storage."""

    key: int
    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int
    dtype: torch.dtype

    @classmethod
    def of(cls, tensor: torch.Tensor) -> _Ref:
        return cls(_key(tensor), tuple(tensor.shape), tensor.stride(), tensor.storage_offset(), tensor.dtype)

    def covers(self, numel: int) -> bool:
        """Whether this view is the whole storage of `numel` elements, contiguous."""
        return self.offset == 0 and _contiguous(self.size, self.stride) and math.prod(self.size) == numel


@dataclass(frozen=True)
class _Op:
    func: Any
    args: Any
    kwargs: Any
    created: list[_Ref]
    writes: list[_Ref]
    seeded: bool


@dataclass
class Recording:
    """The writes that made a model, and where its state ended up."""

    ops: list[_Op]
    numel: dict[int, int]
    """Elements of every storage the recording created."""
    rng_state: torch.Tensor
    """The CPU generator's state when the build began (the seed's)."""


class _Constants(TorchFunctionMode):
    """`torch.tensor(data)` on the meta device keeps no data: make it on the CPU and copy it to meta, which
    the recorder sees (a copy of a constant)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in (torch.tensor, torch.as_tensor) and isinstance(out, torch.Tensor) and out.is_meta:
            out = func(*args, **{**kwargs, "device": "cpu"}).to("meta")
        return out


class _Recorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[_Op] = []
        self.numel: dict[int, int] = {}
        self._keep: list[torch.Tensor] = []  # alive, so no storage's identity is reused by a later one

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if torch.Tag.data_dependent_output in func.tags:
            raise NotRecordable(f"{func} reads a tensor's value during construction")
        outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_meta]
        created = []
        for tensor in outs:
            if _key(tensor) not in self.numel:
                self.numel[_key(tensor)] = tensor.untyped_storage().nbytes() // tensor.element_size()
                self._keep.append(tensor)
                created.append(_Ref.of(tensor))
        writes = []
        for position, argument in enumerate(func._schema.arguments):
            value = args[position] if position < len(args) else kwargs.get(argument.name)
            written = argument.alias_info is not None and argument.alias_info.is_write
            if written and isinstance(value, torch.Tensor) and value.is_meta:
                writes.append(_Ref.of(value))
        if created or writes:
            as_ref = lambda a: _Ref.of(a) if isinstance(a, torch.Tensor) and a.is_meta else a  # noqa: E731
            seeded = torch.Tag.nondeterministic_seeded in func.tags
            self.ops.append(
                _Op(func, tree_map(as_ref, args), tree_map(as_ref, kwargs), created, writes, seeded)
            )
        return out


def record(build: Callable[[], nn.Module]) -> tuple[nn.Module, Recording]:
    """`build()` on the meta device, recorded: (the meta model, its recording). The generator's state is
    taken first and left as it was (nothing on the meta device draws from it)."""
    rng_state = torch.get_rng_state()
    recorder = _Recorder()
    try:
        with torch.device("meta"), _Constants(), recorder:
            model = build()
    except (NotRecordable, UserError):
        raise
    except Exception as error:  # e.g. a constructor that reads a value back (`.item()` has none on meta)
        raise NotRecordable(
            f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        ) from error
    return model, Recording(recorder.ops, recorder.numel, rng_state)


def state_refs(model: nn.Module) -> dict[int, list[tuple[str, _Ref]]]:
    """{storage: [(name, view)]} of every parameter and buffer of the meta model (a tied one under each of
    its names), in the order of its state dict."""
    found: dict[int, list[tuple[str, _Ref]]] = {}
    tensors = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    for name, tensor in tensors:
        found.setdefault(_key(tensor), []).append((name, _Ref.of(tensor)))
    return found


def replay(
    recording: Recording, targets: dict[int, list[tuple[str, _Ref]]]
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Run the recorded writes on the CPU from the recorded generator state; yield, as each target storage
    gets its last write, its [(name, tensor)]. The tensors are valid until the next item is asked for.
    Leaves the generator where the full build leaves it."""
    missing = [names[0][0] for key, names in targets.items() if key not in recording.numel]
    if missing:
        raise NotRecordable(f"no recorded operation made {missing[:3]}")
    reads = _needed(recording, set(targets))
    last_use: dict[int, int] = {}  # storage -> the last needed operation that writes or reads it
    for index, op in enumerate(recording.ops):
        if index in reads:
            for key in (*(ref.key for ref in op.writes), *(ref.key for ref in op.created), *reads[index]):
                last_use[key] = index
    done_at: dict[int, list[int]] = {}  # operation -> the targets complete after it, or the others to free
    freed_at: dict[int, list[int]] = {}
    for key, index in last_use.items():
        (done_at if key in targets else freed_at).setdefault(index, []).append(key)
    real: dict[int, torch.Tensor] = {}
    torch.set_rng_state(recording.rng_state)
    for index, op in enumerate(recording.ops):
        if index in reads:
            _run(op, real, recording.numel)
        elif op.seeded:
            _run_on_scratch(op)
        for key in done_at.get(index, ()):
            yield [(name, _view(real[key], ref)) for name, ref in targets[key]]
            del real[key]
        for key in freed_at.get(index, ()):
            real.pop(key, None)


def _needed(recording: Recording, targets: set[int]) -> dict[int, set[int]]:
    """{index: the storages it reads} of the recorded operations that make a target's final value (walked
    backwards: an operation is needed when it writes memory that something needed reads later; a whole
    overwrite ends that memory's need)."""
    live = set(targets)
    needed: dict[int, set[int]] = {}
    for index in range(len(recording.ops) - 1, -1, -1):
        op = recording.ops[index]
        refs = [leaf for leaf in tree_leaves((op.args, op.kwargs)) if isinstance(leaf, _Ref)]
        written = {ref.key for ref in op.writes} | {ref.key for ref in op.created}
        if not written & live:
            continue
        for ref in op.created:
            live.discard(ref.key)
        overwritten = {
            ref.key for ref in op.writes[:1]
            if str(op.func) in OVERWRITING_OPS and ref.covers(recording.numel.get(ref.key, -1))
        }  # fmt: skip
        live -= overwritten
        first = op.args[0] if op.args else None
        created = {ref.key for ref in op.created}
        needed[index] = {
            ref.key
            for ref in refs
            if not (ref is first and ref.key in overwritten) and ref.key not in created
        }
        live |= needed[index]
    return needed


def _view(base: torch.Tensor, ref: _Ref) -> torch.Tensor:
    return torch.as_strided(base, ref.size, ref.stride, ref.offset)


def _call_on_cpu(op: _Op, tensor_for: Callable[[_Ref], torch.Tensor]) -> Any:
    """`op` with each recorded tensor replaced by `tensor_for(ref)` and the meta device by the CPU."""

    def real(value: Any) -> Any:
        if isinstance(value, _Ref):
            return tensor_for(value)
        if isinstance(value, torch.device) and value.type == "meta":
            return torch.device("cpu")
        return value

    return op.func(*tree_map(real, op.args), **tree_map(real, op.kwargs))


def _run(op: _Op, real: dict[int, torch.Tensor], numel: dict[int, int]) -> None:
    def storage_view(ref: _Ref) -> torch.Tensor:
        if ref.key not in real:  # memory written here first by a partial write: give it its storage
            real[ref.key] = torch.empty(numel[ref.key], dtype=ref.dtype)
        return _view(real[ref.key], ref)

    out = _call_on_cpu(op, storage_view)
    outs = [tensor for tensor in tree_leaves(out) if isinstance(tensor, torch.Tensor)]
    for ref in op.created:
        tensor = next(t for t in outs if tuple(t.shape) == ref.size and t.stride() == ref.stride)
        outs.remove(tensor)
        real[ref.key] = torch.empty(0, dtype=tensor.dtype).set_(tensor.untyped_storage())


def _run_on_scratch(op: _Op) -> None:
    """A random write whose result nothing keeps: run on throwaway tensors of the same layout, so that the
    generator advances exactly as in the full build. An overwritten tensor's values are never read, so only
    the others (a probability tensor) are zeroed."""
    overwrites = str(op.func) in OVERWRITING_OPS
    first = op.args[0] if op.args else None

    def scratch(ref: _Ref) -> torch.Tensor:
        tensor = torch.empty_strided(ref.size, ref.stride, dtype=ref.dtype)
        return tensor if overwrites and ref is first else tensor.zero_()

    _call_on_cpu(op, scratch)


def _contiguous(size: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    expected = 1
    for length, step in reversed(list(zip(size, stride, strict=True))):
        if length != 1 and step != expected:
            return False
        expected *= length
    return True
