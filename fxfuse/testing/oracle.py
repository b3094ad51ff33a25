"""A differential oracle for effects: does a candidate do what its reference does, call after call?

"The same model" means more than equal outputs. Over several calls, on the same inputs:

- the **outputs** are equal (normalised error ``‖Δ‖/‖ref‖`` within a tolerance, same
  structure, shapes and dtypes);
- the **caller's input tensors** end up equal: a forward that updates an argument in place
  (``acc += …``, ``x.relu_()``, ``x[:, :2] = …``) must update it the same way;
- the **state forward changes** is equal: every parameter or buffer the reference's forward
  changes (running statistics, ``self.buf.view(-1).mul_(…)``) must exist, under the same
  name, in the candidate's state, with the same value after every call;
- the **external state** the caller can see (a dict a hook records into) is equal, and never
  holds a tracing object (an ``fx.Proxy``, a fake tensor);
- random ops draw the same numbers: both sides are seeded identically before each call, so a
  candidate that keeps its random ops in order agrees exactly, and one that froze a sample
  (evaluated a random op once) does not.

:func:`same_effects` runs both sides and raises ``AssertionError`` naming the first difference
(which call, which input shapes, what differs, by how much). :class:`Snapshot` checks that
something the caller owns did not change at all (the model given to ``fxfuse.optimize``, its
example inputs, a hook's dict while fxfuse captures the model).

Each side gets its own copies of the inputs, so the two never share a tensor; build the two
models separately too (two instances built from one seed), so hooks of the reference and of
the candidate write to different dicts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from fxfuse.testing import relative_error

__all__ = [
    "CallerChanged",
    "CandidateRaised",
    "EffectMismatch",
    "InputMismatch",
    "OutputMismatch",
    "Side",
    "Snapshot",
    "StateMismatch",
    "StoreMismatch",
    "clone_inputs",
    "describe_inputs",
    "same_effects",
    "tracing_objects",
]


class EffectMismatch(AssertionError):
    """The candidate is not the same model as the reference (see :func:`same_effects`)."""


class OutputMismatch(EffectMismatch):
    """An output differs."""


class InputMismatch(EffectMismatch):
    """A caller's input tensor differs after the call (an in-place update lost or added)."""


class StateMismatch(EffectMismatch):
    """A parameter or buffer forward changes differs, or the candidate has no such state."""


class StoreMismatch(EffectMismatch):
    """What hooks recorded differs, or holds a tracing object."""


class CandidateRaised(EffectMismatch):
    """The candidate raised where the reference did not."""


class CallerChanged(AssertionError):
    """Something the caller owns changed where nothing should have (see :class:`Snapshot`)."""


@dataclass
class Side:
    """One side of a differential run.

    ``call`` is what is called; ``state`` is the module whose parameters and buffers forward
    may change (the fused module for ``fxfuse.optimize``, the caller's own model for a
    ``torch.compile`` d one); ``store`` is external state the caller can see (the dicts
    hooks record into).
    """

    call: Callable[..., Any]
    state: nn.Module | None = None
    store: Any = None


def clone_inputs(inputs: Sequence[Any]) -> tuple[Any, ...]:
    """Fresh copies of the tensors in ``inputs`` (same strides: channels-last stays so)."""
    return tuple(x.clone() if isinstance(x, Tensor) else x for x in inputs)


def describe_inputs(inputs: Sequence[Any]) -> str:
    return ", ".join(
        "x".join(map(str, x.shape)) if isinstance(x, Tensor) else repr(x) for x in inputs
    )


def tracing_objects(value: Any, path: str = "store") -> list[str]:
    """Where ``value`` holds an object of a tracer (an ``fx.Proxy``, a fake or functional
    tensor) instead of a real tensor: such a thing reaching the caller's state is a bug."""
    found: list[str] = []
    if isinstance(value, torch.fx.Proxy):
        found.append(f"{path}: a torch.fx.Proxy")
    elif isinstance(value, Tensor):
        if type(value) not in (Tensor, nn.Parameter):
            found.append(f"{path}: a {type(value).__name__}")
    elif isinstance(value, Mapping):
        for k, v in value.items():
            found += tracing_objects(v, f"{path}[{k!r}]")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            found += tracing_objects(v, f"{path}[{i}]")
    return found


def _differences(expected: Any, actual: Any, path: str, tolerance: float, out: list[str]) -> None:
    """Append a line to ``out`` for each way ``actual`` differs from ``expected``."""
    if isinstance(expected, Tensor):
        if isinstance(actual, torch.fx.Proxy) or not isinstance(actual, Tensor):
            out.append(f"{path}: expected a tensor, got {type(actual).__name__}")
        elif type(actual) not in (Tensor, nn.Parameter):
            out.append(f"{path}: a {type(actual).__name__}, not a real tensor")
        elif expected.shape != actual.shape:
            out.append(f"{path}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}")
        elif expected.dtype != actual.dtype:
            out.append(f"{path}: dtype {actual.dtype}, expected {expected.dtype}")
        elif expected.is_floating_point() or expected.is_complex():
            error = relative_error(expected, actual)
            if not error <= tolerance:
                out.append(f"{path}: normalised error {error:.3g} (tolerance {tolerance:g})")
        elif not torch.equal(expected, actual):
            out.append(f"{path}: values differ")
        return
    if isinstance(expected, Mapping):
        if not isinstance(actual, Mapping) or set(expected) != set(actual):
            keys = sorted(map(str, actual)) if isinstance(actual, Mapping) else type(actual)
            out.append(f"{path}: keys {keys}, expected {sorted(map(str, expected))}")
            return
        for key in expected:
            _differences(expected[key], actual[key], f"{path}[{key!r}]", tolerance, out)
        return
    if isinstance(expected, (list, tuple)):
        if not isinstance(actual, (list, tuple)) or len(expected) != len(actual):
            what = len(actual) if isinstance(actual, (list, tuple)) else type(actual).__name__
            out.append(f"{path}: {what} items, expected {len(expected)}")
            return
        for i, (e, a) in enumerate(zip(expected, actual, strict=True)):
            _differences(e, a, f"{path}[{i}]", tolerance, out)
        return
    if isinstance(actual, torch.fx.Proxy) or expected != actual:
        out.append(f"{path}: {actual!r}, expected {expected!r}")


def _named_state(module: nn.Module | None) -> dict[str, Tensor]:
    if module is None:
        return {}
    state: dict[str, Tensor] = dict(module.named_parameters(remove_duplicate=False))
    state.update(module.named_buffers(remove_duplicate=False))
    return state


def same_effects(
    reference: Side,
    candidate: Side,
    calls: Iterable[Sequence[Any]],
    *,
    tolerance: float = 1e-5,
    seed: int | None = 0,
    no_grad: bool = True,
    after_call: Callable[[int], None] | None = None,
) -> int:
    """Call both sides on each input tuple in ``calls`` (each on its own copies) and assert
    that outputs, inputs, changed state and stores agree after every call.

    ``seed``: both sides run after ``torch.manual_seed(seed + i)`` on call ``i`` (``None``:
    no seeding; then the programs must be deterministic). ``after_call(i)`` runs after each
    call's checks (to check a :class:`Snapshot`, say). Returns the number of calls compared.

    Raises an :class:`EffectMismatch` naming the call, its input shapes and every
    difference found; its type says what differs first (:class:`OutputMismatch`,
    :class:`InputMismatch`, :class:`StateMismatch`, :class:`StoreMismatch`, or
    :class:`CandidateRaised` where the candidate raises and the reference does not).
    """
    mutated: set[str] = set()
    count = 0
    for i, inputs in enumerate(calls):
        ref_inputs, cand_inputs = clone_inputs(inputs), clone_inputs(inputs)
        where = f"call {i + 1} (inputs {describe_inputs(inputs)})"
        before = {k: v.detach().clone() for k, v in _named_state(reference.state).items()}
        with torch.no_grad() if no_grad else torch.enable_grad():
            if seed is not None:
                torch.manual_seed(seed + i)
            expected = reference.call(*ref_inputs)
            if seed is not None:
                torch.manual_seed(seed + i)
            try:
                actual = candidate.call(*cand_inputs)
            except Exception as error:
                first = str(error).strip().splitlines()[0][:300] if str(error).strip() else ""
                raise CandidateRaised(
                    f"{where}: the candidate raised {type(error).__name__}: {first}"
                ) from error
        outputs: list[str] = []
        _differences(expected, actual, "output", tolerance, outputs)
        inputs_after: list[str] = []
        for k, (r, c) in enumerate(zip(ref_inputs, cand_inputs, strict=True)):
            _differences(r, c, f"input {k} after the call", tolerance, inputs_after)
        state: list[str] = []
        ref_state = _named_state(reference.state)
        mutated.update(
            name
            for name, value in ref_state.items()
            if name not in before or not torch.equal(before[name], value)
        )
        cand_state = _named_state(candidate.state)
        for name in sorted(mutated):
            if name not in cand_state:
                state.append(
                    f"state {name!r}: forward changes it, but the candidate has no {name!r}"
                )
            else:
                _differences(ref_state[name], cand_state[name], f"state {name!r}", tolerance, state)
        store: list[str] = []
        if reference.store is not None or candidate.store is not None:
            store += tracing_objects(candidate.store, "store")
            _differences(reference.store, candidate.store, "store", tolerance, store)
        found = [
            (kind, lines)
            for kind, lines in [
                (OutputMismatch, outputs),
                (InputMismatch, inputs_after),
                (StateMismatch, state),
                (StoreMismatch, store),
            ]
            if lines
        ]
        if found:
            # the first kind names the failure (hypothesis tells failures apart by type)
            raise found[0][0](
                f"{where}: " + "; ".join(line for _, lines in found for line in lines)
            )
        if after_call is not None:
            after_call(i)
        count += 1
    return count


@dataclass
class Snapshot:
    """What a caller owns, recorded so a test can assert that nothing changed it.

    For a module: every parameter and buffer (values, identity), the attribute names of every
    submodule (``torch.fx`` adds ``_tensor_constant0`` where ``forward`` builds a tensor) and
    its hooks. For tensors: their values. For dicts and lists (a hook's store): their
    structure and tensors.
    """

    things: dict[str, Any]
    _saved: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._saved = {name: _record(value) for name, value in self.things.items()}

    def changes(self) -> list[str]:
        """What changed since the snapshot, one line each (empty: nothing)."""
        lines: list[str] = []
        for name, value in self.things.items():
            _compare_records(self._saved[name], _record(value), name, lines)
        return lines

    def assert_unchanged(self, when: str) -> None:
        lines = self.changes()
        if lines:
            raise CallerChanged(f"{when}, the caller's objects changed: " + "; ".join(lines))


def _record(value: Any) -> Any:
    if isinstance(value, nn.Module):
        return {
            "tensors": {k: (id(v), v.detach().clone()) for k, v in _named_state(value).items()},
            "attributes": {
                name: sorted(vars(m)) for name, m in value.named_modules(remove_duplicate=False)
            },
            "hooks": {
                name: (len(m._forward_hooks), len(m._forward_pre_hooks))
                for name, m in value.named_modules(remove_duplicate=False)
            },
            "training": {name: m.training for name, m in value.named_modules()},
        }
    if isinstance(value, Tensor):
        return ("tensor", type(value), value.detach().clone())
    if isinstance(value, Mapping):
        return {k: _record(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_record(v) for v in value]
    return (
        "object",
        type(value),
        repr(value) if isinstance(value, (int, float, str)) else id(value),
    )


def _compare_records(old: Any, new: Any, path: str, lines: list[str]) -> None:
    if isinstance(old, tuple) and old and old[0] == "tensor":
        if not (isinstance(new, tuple) and new and new[0] == "tensor"):
            lines.append(f"{path}: no longer a tensor")
        elif new[1] is not old[1]:
            lines.append(f"{path}: now a {new[1].__name__}")
        elif old[2].shape != new[2].shape or not torch.equal(old[2], new[2]):
            lines.append(f"{path}: values changed")
        return
    if isinstance(old, dict) and "tensors" in old and "attributes" in old:
        assert isinstance(new, dict)
        for name, (ident, tensor) in old["tensors"].items():
            now = new["tensors"].get(name)
            if now is None:
                lines.append(f"{path}.{name}: removed")
            elif now[0] != ident:
                lines.append(f"{path}.{name}: replaced by another tensor")
            elif tensor.shape != now[1].shape or not torch.equal(tensor, now[1]):
                lines.append(f"{path}.{name}: values changed")
        for name in set(new["tensors"]) - set(old["tensors"]):
            lines.append(f"{path}.{name}: added")
        for name, attributes in old["attributes"].items():
            added = sorted(set(new["attributes"].get(name, [])) - set(attributes))
            removed = sorted(set(attributes) - set(new["attributes"].get(name, [])))
            where = f"{path}.{name}" if name else path
            if added:
                lines.append(f"{where} gained attributes {added}")
            if removed:
                lines.append(f"{where} lost attributes {removed}")
        if old["hooks"] != new["hooks"]:
            lines.append(f"{path}: hooks changed")
        if old["training"] != new["training"]:
            lines.append(f"{path}: training flags changed")
        return
    if isinstance(old, dict):
        if not isinstance(new, dict) or set(old) != set(new):
            keys = sorted(map(str, new)) if isinstance(new, dict) else type(new).__name__
            lines.append(f"{path}: keys {keys}, were {sorted(map(str, old))}")
            return
        for k in old:
            _compare_records(old[k], new[k], f"{path}[{k!r}]", lines)
        return
    if isinstance(old, list):
        if not isinstance(new, list) or len(old) != len(new):
            lines.append(
                f"{path}: {len(new) if isinstance(new, list) else '?'} items, were {len(old)}"
            )
            return
        for i, (o, n) in enumerate(zip(old, new, strict=True)):
            _compare_records(o, n, f"{path}[{i}]", lines)
        return
    if old != new:
        lines.append(f"{path}: changed")
