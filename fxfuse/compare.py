"""Comparing a candidate's outputs with a reference's: the one definition of "the same".

Both :func:`fxfuse.verify` (whole models on drawn inputs) and the per-rewrite check
(:mod:`fxfuse.validate`, a matched subgraph against its replacement) use it:

- outputs are walked together: tensors, and tuples, lists and dicts of them, to any depth;
  each tensor is named by its path (``output[1]['logits']``);
- a tensor's error is normalised, ``‖candidate − reference‖ / ‖reference‖`` in float64
  (``‖Δ‖`` alone when the reference is zero): randomly initialised networks reach 1e15, so a
  bare absolute tolerance means nothing (docs/design.md, trap 5);
- the tolerance depends on the dtype, the less precise of the two tensors';
- a non-finite value where the reference is finite is a failure whatever the error; positions
  where the reference itself is not finite are left out of the comparison.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from fxfuse.kernels import exact

__all__ = [
    "TOLERANCES",
    "Comparison",
    "Difference",
    "StructureMismatch",
    "compare_outputs",
    "ieee_float32",
    "normalised_error",
    "paired_leaves",
    "tolerance_for",
]

TOLERANCES: Mapping[torch.dtype, float] = {
    torch.float64: 1e-10,
    torch.complex128: 1e-10,
    torch.float32: 1e-5,
    torch.complex64: 1e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 2e-2,
}


def tolerance_for(
    *dtypes: torch.dtype, override: float | Mapping[torch.dtype, float] | None = None
) -> float:
    """The tolerance for comparing tensors of ``dtypes``: the loosest of theirs.

    ``override`` is one number for every dtype, or a table that replaces entries of
    :data:`TOLERANCES`. Integer and bool tensors must match exactly (0).
    """
    if isinstance(override, (int, float)):
        return float(override)
    table = {**TOLERANCES, **(override or {})}
    worst = 0.0
    for dtype in dtypes:
        if dtype in table:
            worst = max(worst, table[dtype])
        elif dtype.is_floating_point:  # float8 and friends: ten ulps, at least float32's
            worst = max(worst, 1e-5, 10 * torch.finfo(dtype).eps)
    return worst


class StructureMismatch(Exception):
    """The two outputs are not the same nesting of containers; ``path`` names where."""

    def __init__(self, path: str, detail: str):
        super().__init__(f"{path}: {detail}")
        self.path = path
        self.detail = detail


def _kind(value: Any) -> str:
    if isinstance(value, Tensor):
        return "tensor"
    if isinstance(value, Mapping):
        return "dict"
    if isinstance(value, (list, tuple)):
        return "sequence"
    return "value"


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    if isinstance(value, Mapping):
        return f"a dict with keys {sorted(map(str, value))}"
    if isinstance(value, (list, tuple)):
        return f"a {type(value).__name__} of {len(value)}"
    return f"{type(value).__name__} {value!r}"


def paired_leaves(
    reference: Any, candidate: Any, path: str = "output"
) -> Iterator[tuple[str, Any, Any]]:
    """``(path, reference leaf, candidate leaf)`` for matching leaves of two nested outputs.

    Raises :class:`StructureMismatch` where the nesting differs (a tuple against a tensor, a
    missing key, a list of another length).
    """
    kinds = _kind(reference), _kind(candidate)
    if kinds[0] != kinds[1]:
        raise StructureMismatch(
            path,
            f"the reference gives {_describe(reference)}, the candidate {_describe(candidate)}",
        )
    if kinds[0] == "dict":
        if set(reference) != set(candidate):
            missing = sorted(map(repr, set(reference) - set(candidate)))
            extra = sorted(map(repr, set(candidate) - set(reference)))
            detail = "; ".join(
                part
                for part in (
                    f"the candidate lacks {', '.join(missing)}" if missing else "",
                    f"the candidate adds {', '.join(extra)}" if extra else "",
                )
                if part
            )
            raise StructureMismatch(path, detail)
        for key in reference:
            yield from paired_leaves(reference[key], candidate[key], f"{path}[{key!r}]")
    elif kinds[0] == "sequence":
        if len(reference) != len(candidate):
            raise StructureMismatch(
                path,
                f"the reference gives {_describe(reference)}, the candidate {_describe(candidate)}",
            )
        for i, (r, c) in enumerate(zip(reference, candidate, strict=True)):
            yield from paired_leaves(r, c, f"{path}[{i}]")
    else:
        yield path, reference, candidate


def normalised_error(reference: Tensor, candidate: Tensor) -> tuple[float, int]:
    """``‖candidate − reference‖ / ‖reference‖`` over the positions where the reference is
    finite (``‖Δ‖`` when the reference is zero there), and how many of those positions the
    candidate fills with NaN or ±inf. Computed in float64; shapes must be equal."""
    r = exact(reference)
    c = exact(candidate).to(r.device)
    if r.is_complex() or c.is_complex():
        r, c = (
            torch.view_as_real(r.to(torch.complex128)),
            torch.view_as_real(c.to(torch.complex128)),
        )
    finite = torch.isfinite(r)
    bad = int((finite & ~torch.isfinite(c)).sum())
    if bad:
        return math.inf, bad
    zero = torch.zeros((), dtype=r.dtype, device=r.device)
    delta = torch.where(finite, c - r, zero).norm()
    scale = torch.where(finite, r, zero).norm()
    error = float(delta / scale) if scale > 0 else float(delta)
    return (error if error == error else math.inf), 0


@dataclass(frozen=True)
class Difference:
    """Why the candidate's ``output`` is not the reference's.

    ``kind``: ``"mismatch"`` (error above tolerance), ``"non-finite"``, ``"shape"``,
    ``"structure"`` or ``"raised"`` (the candidate raised where the reference did not).
    """

    output: str
    kind: str
    detail: str
    error: float = math.inf
    tolerance: float = 0.0


@dataclass
class Comparison:
    """Errors per output path, with their tolerances, and the worst failure (if any)."""

    errors: dict[str, tuple[float, float]] = field(default_factory=dict)
    failure: Difference | None = None

    @property
    def worst(self) -> tuple[str, float]:
        """The output with the largest error, and that error (``("", 0.0)`` when there is none)."""
        if not self.errors:
            return "", 0.0
        path = max(self.errors, key=lambda p: self.errors[p][0])
        return path, self.errors[path][0]


def _leaf_difference(
    path: str, r: Any, c: Any, comparison: Comparison, override: Any
) -> Difference | None:
    if not isinstance(r, Tensor):
        same = r == c or (isinstance(r, float) and isinstance(c, float) and math.isclose(r, c))
        return (
            None
            if same
            else Difference(path, "mismatch", f"the reference gives {r!r}, the candidate {c!r}")
        )
    if r.shape != c.shape:
        return Difference(
            path,
            "shape",
            f"the reference gives shape {tuple(r.shape)}, the candidate {tuple(c.shape)}",
        )
    tolerance = tolerance_for(r.dtype, c.dtype, override=override)
    error, bad = normalised_error(r, c)
    comparison.errors[path] = (error, tolerance)
    if bad:
        return Difference(
            path,
            "non-finite",
            f"the candidate gives NaN or inf at {bad} position(s) where the reference is finite",
            error,
            tolerance,
        )
    if error > tolerance:
        return Difference(
            path,
            "mismatch",
            f"normalised error {error:.3g} > tolerance {tolerance:.3g} ({c.dtype})",
            error,
            tolerance,
        )
    return None


def compare_outputs(
    reference: Any,
    candidate: Any,
    tolerance: float | Mapping[torch.dtype, float] | None = None,
    root: str = "output",
) -> Comparison:
    """Compare two nested outputs leaf by leaf (see the module docstring); paths start at
    ``root`` (``output[1]['logits']``).

    The failure reported is the structural one if the nesting differs, else the one furthest
    above its tolerance.
    """
    comparison = Comparison()
    failures: list[Difference] = []
    try:
        for path, r, c in paired_leaves(reference, candidate, root):
            difference = _leaf_difference(path, r, c, comparison, tolerance)
            if difference is not None:
                failures.append(difference)
    except StructureMismatch as mismatch:
        comparison.failure = Difference(mismatch.path, "structure", mismatch.detail)
        return comparison
    if failures:
        comparison.failure = max(
            failures, key=lambda d: d.error / d.tolerance if d.tolerance else math.inf
        )
    return comparison


@contextlib.contextmanager
def ieee_float32(active: bool = True) -> Iterator[None]:
    """Full float32 precision for CUDA convs and matmuls (no TF32) while comparing (verifying,
    benchmarking): TF32's 10-bit mantissa would hide a 1e-3 error and flag a correct fusion."""
    if not active:
        yield
        return
    conv = getattr(torch.backends.cudnn, "conv", None)
    matmul = torch.backends.cuda.matmul
    if conv is not None and hasattr(conv, "fp32_precision"):
        saved = conv.fp32_precision, matmul.fp32_precision
        conv.fp32_precision = matmul.fp32_precision = "ieee"
        try:
            yield
        finally:
            conv.fp32_precision, matmul.fp32_precision = saved
    else:  # pragma: no cover - torch before the fp32_precision API
        legacy = torch.backends.cudnn.allow_tf32, matmul.allow_tf32
        torch.backends.cudnn.allow_tf32 = matmul.allow_tf32 = False
        try:
            yield
        finally:
            torch.backends.cudnn.allow_tf32, matmul.allow_tf32 = legacy
