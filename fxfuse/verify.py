"""``fxfuse.verify``: differential, property-based checking of a candidate against a reference.

    report = fxfuse.verify(model, fused, example_inputs=(x,))   # VerificationError on a mismatch

The verifier draws inputs with hypothesis *around* the example (see
:mod:`fxfuse.testing.strategies`): batch sizes 1…3, other spatial sizes (odd and even, from
half the example's to 1.125×: stride and alignment bugs show at some sizes only), values normal,
uniform, large, small and all negative, contiguous and channels-last. Which sizes the model
accepts is found by asking it: each size is probed once on the reference, and a size it rejects
is kept at the example's; a drawn input the reference rejects is skipped, never a failure.

Each output (tensors in tuples, lists and dicts, to any depth) is compared with a normalised
error and a dtype-aware tolerance (:mod:`fxfuse.compare`). On a mismatch hypothesis shrinks the
input (towards the example's shape, batch 1, normal values) and :class:`~fxfuse.VerificationError`
carries the result. Runs are deterministic for a ``seed``, use no hypothesis database and
write nothing to the working directory (hypothesis' own caches go to a temporary directory),
run under ``torch.no_grad()`` with TF32 off, and leave both models as they were (buffers a
forward pass updates are restored).

Called inside a running hypothesis test, the verifier draws its inputs from that test instead
of starting a nested search, so hypothesis shrinks the model and the inputs together.

hypothesis is needed at run time: ``pip install 'fxfuse[verify]'``.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import logging
import math
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor, nn

from fxfuse.compare import Comparison, Difference, compare_outputs, ieee_float32
from fxfuse.errors import NondeterministicError, VerificationError

__all__ = ["VerificationReport", "buffers_restored", "fresh_copies", "verify"]

log = logging.getLogger("fxfuse")


@dataclass
class VerificationReport:
    """What :func:`fxfuse.verify` checked: how many inputs, which shapes, the worst error.

    ``examples`` counts the inputs compared (the example included), ``skipped`` the drawn
    inputs the reference rejected; ``varied``/``fixed`` say which sizes were drawn and which
    were kept at the example's, and why.
    """

    examples: int = 0
    skipped: int = 0
    worst_error: float = 0.0
    worst_output: str = ""
    worst_input: str = ""
    shapes: list[str] = field(default_factory=list)
    distributions: Counter[str] = field(default_factory=Counter)
    channels_last: int = 0
    varied: list[str] = field(default_factory=list)
    fixed: list[str] = field(default_factory=list)
    tolerances: dict[str, float] = field(default_factory=dict)
    drawn_by: str = ""
    seconds: float = 0.0

    def __str__(self) -> str:
        lines = [
            f"fxfuse.verify: {self.examples} inputs agree ({self.drawn_by}, "
            f"{self.seconds:.2f} s; {self.skipped} drawn inputs the reference rejects skipped)",
            f"  worst normalised error {self.worst_error:.3g} at {self.worst_output or 'output'}"
            + (f" on {self.worst_input}" if self.worst_input else ""),
            "  tolerances: "
            + ", ".join(f"{path} {tol:g}" for path, tol in self.tolerances.items()),
            f"  input shapes ({len(self.shapes)}): "
            + ", ".join(self.shapes[:12])
            + (" …" if len(self.shapes) > 12 else ""),
            "  values: "
            + ", ".join(f"{name} {n}" for name, n in sorted(self.distributions.items()))
            + f"; channels_last {self.channels_last}",
        ]
        lines += [f"  varied: {v}" for v in self.varied]
        lines += [f"  kept: {f}" for f in self.fixed]
        return "\n".join(lines)


def _strategies() -> ModuleType:
    try:
        return importlib.import_module("fxfuse.testing.strategies")
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "fxfuse.verify draws its inputs with hypothesis, which is not installed: "
            "pip install 'fxfuse[verify]' (or pip install hypothesis)"
        ) from error


# --------------------------------------------------------------------------------------------
# Running models without changing them
# --------------------------------------------------------------------------------------------


def _private_copy(model: Any) -> Any:
    """A deep copy of a module for :func:`verify` to run; the module itself (its buffers then
    restored after the runs) where it cannot be copied, and any other callable as it is."""
    if not isinstance(model, nn.Module):
        return model
    try:
        return copy.deepcopy(model)
    except Exception as error:  # (a lock, an open file, a generator among its attributes)
        log.info("verify runs %s itself: it cannot be copied (%s)", type(model).__name__, error)
        return model


@contextlib.contextmanager
def buffers_restored(*models: Any) -> Iterator[None]:
    """Restore every buffer a forward pass updates in place (a batch norm in training mode
    updates its running statistics); parameters are never written under ``no_grad``."""
    saved = [
        (buffer, buffer.detach().clone())
        for model in models
        if isinstance(model, nn.Module)
        for buffer in model.buffers()
    ]
    try:
        yield
    finally:
        with torch.no_grad():  # (native batch norm kernels do not bump _version: compare)
            for buffer, copy in saved:
                if not torch.equal(buffer, copy):
                    buffer.copy_(copy)


def fresh_copies(inputs: Sequence[Any]) -> tuple[Any, ...]:
    """``inputs`` with every tensor (in tuples, lists and dicts too) cloned: a run that changes
    its inputs in place (a model that normalizes ``x`` with ``x.sub_(…)``) changes only its
    own copy, so every run sees the same values and the caller's tensors never change."""
    return tuple(
        pytree.tree_map_only(Tensor, lambda t: t.clone(), tuple(inputs))  # (keeps strides)
    )


def _on_cuda(models: Sequence[Any], inputs: Sequence[Any]) -> bool:
    tensors = [x for x in inputs if isinstance(x, Tensor)]
    for model in models:
        if isinstance(model, nn.Module):
            tensors += list(model.parameters())[:1]
    return any(t.is_cuda for t in tensors)


# --------------------------------------------------------------------------------------------
# One verification run
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Outcome:
    rejected: bool = False
    failure: Difference | None = None


_REJECTED = _Outcome(rejected=True)


class _Counterexample(Exception):
    """Raised inside the property so hypothesis shrinks it; carries the case."""

    def __init__(self, case: Any, failure: Difference):
        super().__init__(failure.detail)
        self.case, self.failure = case, failure


def _shapes(inputs: Sequence[Any]) -> str:
    shapes = ["x".join(map(str, x.shape)) for x in inputs if isinstance(x, Tensor)]
    return ", ".join(shapes) or "no tensors"


class _Job:
    """The reference, the candidate, the example and the axes to vary; runs one input."""

    def __init__(
        self,
        reference: Callable[..., Any],
        candidate: Callable[..., Any],
        example: tuple[Any, ...],
        tolerance: float | Mapping[torch.dtype, float] | None,
        seed: int,
        strategies: ModuleType,
    ):
        self.reference, self.candidate = reference, candidate
        self.example, self.tolerance, self.seed = example, tolerance, seed
        self.strategies = strategies
        self.axes: tuple[Any, ...] = ()
        self.report = VerificationReport()
        self.fatal: Exception | None = None
        self._shapes: dict[str, None] = {}

    # -- the example ------------------------------------------------------------------------

    def check_example(self) -> None:
        """Run both models on the example: the reference must accept it and be a function of
        it; the candidate must agree (else the example itself is the counterexample)."""
        try:
            expected = _call(self.reference, self.example)
        except Exception as error:
            raise ValueError(
                f"the reference raises on example_inputs ({_shapes(self.example)}): "
                f"{type(error).__name__}: {error}; pass inputs it accepts"
            ) from error
        self._check_deterministic(self.example, expected)
        failure = self._compare(self.example, expected, "the example")
        if failure is not None:
            raise self._error(failure, self.example, None, "on the example inputs")

    def _check_deterministic(self, inputs: tuple[Any, ...], expected: Any) -> None:
        again = _call(self.reference, inputs)
        comparison = compare_outputs(expected[0], again[0], self.tolerance)
        if comparison.failure is not None:
            failure = comparison.failure
            raise NondeterministicError(
                f"the reference gives different outputs for the same input ({_shapes(inputs)}): "
                f"at {failure.output}, {failure.detail}. It is not a function of its input, so "
                "no candidate can be checked against it: is it in training mode (dropout, batch "
                "norm with batch statistics)? Call .eval(), or remove the random op."
            )

    # -- axes ---------------------------------------------------------------------------------

    def choose_axes(self, batch_sizes: tuple[int, int] | None, spatial: bool) -> None:
        """Vary each axis the reference accepts another size on; keep the others."""
        s = self.strategies
        # larger spatial sizes up to 1.125× (not 1.5×): a larger input finds the stride and
        # alignment bugs a smaller odd or even one does, at up to 2.25× a pass's cost
        axes = s.input_axes(self.example, batch_sizes=batch_sizes, spatial=spatial, larger=_larger)
        base = tuple(axis.size for axis in axes)
        free = []
        for k, axis in enumerate(axes):
            others = [v for v in range(axis.low, axis.high + 1) if v != axis.size]
            if not others:
                continue
            probe = min(others, key=lambda v: (abs(v - axis.size), -v))
            sizes = (*base[:k], probe, *base[k + 1 :])
            inputs = s.build_inputs(
                self.example, axes, s.InputCase(sizes, "normal", False), self.seed
            )
            try:
                self.reference(*fresh_copies(inputs))
            except Exception as error:
                first = str(error).strip().splitlines()[0][:120] if str(error).strip() else ""
                self.report.fixed.append(
                    f"{axis.describe()} at {axis.size}: the reference rejects {probe} "
                    f"({type(error).__name__}: {first})"
                )
                continue
            free.append(axis)
            self.report.varied.append(f"{axis.describe()}: {axis.low}…{axis.high}")
        self.axes = tuple(free)

    # -- one drawn input ---------------------------------------------------------------------

    def run(self, case: Any) -> _Outcome:
        if self.fatal is not None:
            raise self.fatal
        inputs = self.strategies.build_inputs(self.example, self.axes, case, self.seed)
        try:
            expected = _call(self.reference, inputs)
        except Exception:
            self.report.skipped += 1
            return _REJECTED
        failure = self._compare(inputs, expected, f"{_shapes(inputs)}, {case.describe()}")
        self.report.distributions[case.distribution] += 1
        self.report.channels_last += case.channels_last
        if failure is not None:
            try:
                self._check_deterministic(inputs, expected)
            except NondeterministicError as error:
                self.fatal = error
                raise
        return _Outcome(failure=failure)

    def _compare(
        self, inputs: tuple[Any, ...], expected: tuple[Any, tuple[Any, ...]], where: str
    ) -> Difference | None:
        """Run the candidate on copies of ``inputs`` and compare its output, and what it left
        in its inputs (a model may update an argument in place), with the reference's."""
        try:
            actual = _call(self.candidate, inputs)
        except Exception as error:
            return Difference(
                "output", "raised", f"the candidate raised {type(error).__name__}: {error}"
            )
        comparison: Comparison = compare_outputs(expected[0], actual[0], self.tolerance)
        # inputs either call changed in place: the candidate must leave them as the reference
        written = sorted({*_written(inputs, expected[1]), *_written(inputs, actual[1])})
        if written:
            effects = compare_outputs(
                {f"[{i}]": expected[1][i] for i in written},
                {f"[{i}]": actual[1][i] for i in written},
                self.tolerance,
                root="input",
            )
            comparison.errors.update(effects.errors)
            comparison.failure = comparison.failure or effects.failure
        report = self.report
        report.examples += 1
        self._shapes.setdefault(_shapes(inputs))
        for path, (error, tolerance) in comparison.errors.items():
            report.tolerances.setdefault(path, tolerance)
            if error > report.worst_error or not report.worst_output:
                report.worst_error, report.worst_output, report.worst_input = error, path, where
        return comparison.failure

    # -- results ------------------------------------------------------------------------------

    def finish(self, started: float) -> VerificationReport:
        self.report.shapes = list(self._shapes)
        self.report.seconds = time.perf_counter() - started
        return self.report

    def _error(
        self, failure: Difference, inputs: tuple[Any, ...], case: Any, how: str
    ) -> VerificationError:
        what = {
            "structure": "has another output structure than the reference",
            "shape": "gives another shape than the reference",
            "raised": "raises where the reference does not",
            "non-finite": "gives NaN/inf where the reference is finite",
            "mismatch": "differs from the reference",
        }[failure.kind]
        values = f"; {case.describe()}" if case is not None else ""
        message = (
            f"the candidate {what} at {failure.output}: {failure.detail}\n"
            f"  counterexample {how}: input shapes {_shapes(inputs)}{values}\n"
            f"  ({self.report.examples} inputs compared, {self.report.drawn_by}; "
            "the inputs are on this error's .inputs)"
        )
        return VerificationError(
            message,
            kind=failure.kind,
            output=failure.output,
            error=None if math.isinf(failure.error) else failure.error,
            tolerance=failure.tolerance,
            inputs=inputs,
            distribution=getattr(case, "distribution", None),
            channels_last=bool(getattr(case, "channels_last", False)),
            seed=self.seed,
        )

    def error_for(self, case: Any, failure: Difference, how: str) -> VerificationError:
        inputs = self.strategies.build_inputs(self.example, self.axes, case, self.seed)
        return self._error(failure, inputs, case, how)


def _larger(size: int) -> int:
    """The largest spatial size drawn for an example's ``size``: a little larger, odd and
    even."""
    return size + max(2, size // 8)


def _call(fn: Callable[..., Any], inputs: tuple[Any, ...]) -> tuple[Any, tuple[Any, ...]]:
    """``fn``'s output on fresh copies of ``inputs``, and those copies after the call."""
    copies = fresh_copies(inputs)
    return fn(*copies), copies


def _written(before: tuple[Any, ...], after: tuple[Any, ...]) -> list[int]:
    """The positions of the tensor inputs a call changed in place."""
    return [
        i
        for i, (b, a) in enumerate(zip(before, after, strict=True))
        if isinstance(b, Tensor) and isinstance(a, Tensor) and not torch.equal(a, b)
    ]


@contextlib.contextmanager
def _scratch_storage() -> Iterator[None]:
    """Even without a database, hypothesis caches the constants it finds in local source files
    under ``./.hypothesis``; give it a temporary home for the search, then remove it."""
    from hypothesis import configuration

    try:  # (module-level, so not name-mangled; guarded as it is not public API)
        previous = vars(configuration)["__hypothesis_home_directory"]
        set_home = configuration.set_hypothesis_home_dir
    except (KeyError, AttributeError):  # pragma: no cover - another hypothesis
        yield
        return
    with tempfile.TemporaryDirectory(prefix="fxfuse-verify-") as scratch:
        set_home(scratch)
        try:
            yield
        finally:
            set_home(previous)


def _checked_knobs(examples: Any, tolerance: Any, batch_sizes: Any) -> tuple[int, int] | None:
    """Refuse bad ``verify`` arguments at the call, one line each; the batch sizes as a pair."""
    if isinstance(examples, bool) or not isinstance(examples, int):
        raise TypeError(f"verify's examples must be an int, got {examples!r}")
    if examples < 0:
        raise ValueError(f"verify's examples must be ≥ 0 (0: the example alone), got {examples}")
    if tolerance is not None:
        for value in tolerance.values() if isinstance(tolerance, Mapping) else [tolerance]:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(
                    "verify's tolerance must be a number (the normalised error allowed) or a "
                    f"mapping from dtype to one, got {tolerance!r}"
                )
            if not value >= 0:
                raise ValueError(f"verify's tolerance must be ≥ 0, got {tolerance!r}")
    if batch_sizes is None:
        return None
    pair = tuple(batch_sizes) if isinstance(batch_sizes, Sequence) else ()
    if (
        len(pair) != 2
        or not all(isinstance(n, int) and not isinstance(n, bool) for n in pair)
        or not 1 <= pair[0] <= pair[1]
    ):
        raise ValueError(
            "verify's batch_sizes must be a pair (low, high) with 1 ≤ low ≤ high, or None to "
            f"keep the example's batch size, got {batch_sizes!r}"
        )
    return (pair[0], pair[1])


def _search(job: _Job, cases: Any, examples: int, seed: int, deadline: float | None) -> None:
    """A hypothesis search of its own: ``examples`` inputs, shrunk on failure, deterministic."""
    from hypothesis import HealthCheck, Phase, Verbosity, given, reject, settings
    from hypothesis import seed as seed_search
    from hypothesis.errors import Unsatisfiable

    outcomes: dict[Any, _Outcome] = {}  # every case once: replays agree, shrinking is cheap
    stop = math.inf if deadline is None else time.monotonic() + deadline

    @seed_search(seed)
    @settings(
        settings.get_profile("default"),  # not the caller's profile: a seed must mean one search
        max_examples=examples,
        derandomize=False,
        database=None,
        deadline=None,
        phases=(Phase.generate, Phase.shrink),
        suppress_health_check=list(HealthCheck),
        verbosity=Verbosity.quiet,
        report_multiple_bugs=False,
        print_blob=False,
    )
    @given(cases)
    def agree(case: Any) -> None:
        outcome = outcomes.get(case)
        if outcome is None:
            if time.monotonic() > stop:
                return  # out of time: no new inputs (a failure already found still stands)
            outcome = outcomes[case] = job.run(case)
        if outcome.rejected:
            reject()
        if outcome.failure is not None:
            raise _Counterexample(case, outcome.failure)

    try:
        with _scratch_storage():
            agree()
    except _Counterexample as found:
        raise job.error_for(found.case, found.failure, "(shrunk)") from None
    except Unsatisfiable:
        log.info("fxfuse.verify: the reference rejected every drawn input")


def _enclosing_draw() -> Callable[[Any], Any] | None:
    """Inside a running hypothesis test: a draw from that test's data; else ``None``."""
    from hypothesis import currently_in_test_context

    if not currently_in_test_context():
        return None
    try:  # what st.data() hands a test; semi-public, so guarded
        from hypothesis.control import current_build_context
        from hypothesis.strategies import DataObject

        data = DataObject(current_build_context().data)
    except (ImportError, AttributeError, TypeError):  # pragma: no cover - other hypothesis
        return None
    return lambda strategy: data.draw(strategy, label="fxfuse.verify inputs")


def verify(
    reference: Callable[..., Any],
    candidate: Callable[..., Any],
    example_inputs: Sequence[Any] | Tensor,
    *,
    examples: int = 20,
    seed: int = 0,
    deadline: float | None = None,
    tolerance: float | Mapping[torch.dtype, float] | None = None,
    batch_sizes: tuple[int, int] | None = (1, 3),
    spatial: bool = True,
    distributions: Sequence[str] | None = None,
    channels_last: bool = True,
) -> VerificationReport:
    """Check that ``candidate`` computes what ``reference`` does, on inputs drawn around
    ``example_inputs``; raise :class:`~fxfuse.VerificationError` with a shrunk counterexample
    if it does not.

    Args:
        reference: the model (or any callable) taken as correct; it is run, never modified.
        candidate: the model to check (e.g. ``fxfuse.optimize(reference)``).
        example_inputs: positional inputs both accept (a tensor alone is one input), in
            ``N, C, *spatial`` layout; drawn inputs vary their batch and spatial sizes and
            values (see :mod:`fxfuse.testing.strategies`). Non-floating tensors keep their
            values; other arguments are passed as they are.
        examples: how many drawn inputs to compare, besides the example.
        seed: the search's seed: the same seed draws the same inputs.
        deadline: seconds the search may take (drawing and shrinking); ``None``: no limit.
        tolerance: the normalised error allowed, one number or per dtype; default
            :data:`fxfuse.compare.TOLERANCES` (1e-5 for float32, 1e-10 for float64, …).
        batch_sizes: the batch sizes to draw, ``(low, high)``; ``None`` keeps the example's.
            Every drawn sample costs a forward pass of both models: with batches up to 4
            and spatial sizes up to 1.5×, the default check cost ~52 forward passes of the
            reference at the example's size; up to 3 and 1.125×, about 30.
        spatial: whether to draw other spatial sizes.
        distributions: value distributions to draw from (default all of
            :data:`fxfuse.testing.strategies.DISTRIBUTIONS`).
        channels_last: whether to draw channels-last layouts for rank-4/5 inputs.

    Returns:
        A :class:`VerificationReport`: inputs compared, worst error, shapes covered.

    Raises:
        VerificationError: an output differs (beyond tolerance, in shape, in structure, NaN
            or inf where the reference is finite), or the candidate raises where the
            reference does not. It carries the counterexample.
        NondeterministicError: the reference gives two outputs for one input.
        ValueError: the reference rejects ``example_inputs``.
        ImportError: hypothesis is not installed.
    """
    strategies = _strategies()
    example = (example_inputs,) if isinstance(example_inputs, Tensor) else tuple(example_inputs)
    batch_sizes = _checked_knobs(examples, tolerance, batch_sizes)
    started = time.perf_counter()
    # run copies: a forward may keep Python state (a call counter, a log) that buffers_restored
    # cannot put back; the caller's models are never run
    reference, candidate = _private_copy(reference), _private_copy(candidate)
    job = _Job(reference, candidate, example, tolerance, seed, strategies)
    draw = _enclosing_draw()
    job.report.drawn_by = "drawn by the enclosing hypothesis test" if draw else f"seed {seed}"
    models = (reference, candidate)
    with (
        torch.no_grad(),
        buffers_restored(*models),
        ieee_float32(_on_cuda(models, example)),
    ):
        job.check_example()
        job.choose_axes(batch_sizes, spatial)
        layouts = channels_last and any(
            isinstance(x, Tensor) and x.is_floating_point() and x.dim() in (4, 5) for x in example
        )
        cases = strategies.input_cases(
            job.axes,
            distributions=strategies.DISTRIBUTIONS if distributions is None else distributions,
            channels_last=layouts,
        )
        if draw is None:
            if examples > 0:  # (0: the example alone)
                _search(job, cases, examples, seed, deadline)
        else:
            stop = math.inf if deadline is None else time.monotonic() + deadline
            for _ in range(examples):
                if time.monotonic() > stop:
                    break
                case = draw(cases)
                outcome = job.run(case)
                if outcome.failure is not None:
                    raise job.error_for(case, outcome.failure, "(from the enclosing test)")
    report = job.finish(started)
    log.info("%s", report)
    return report
