"""Exceptions fxfuse raises. Each message names the construct and says what to try."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = [
    "CaptureError",
    "ConvergenceError",
    "FxFuseError",
    "FxFuseWarning",
    "NondeterministicError",
    "TrainingModeError",
    "VerificationError",
]


class FxFuseError(Exception):
    """Base class of every error fxfuse raises on purpose."""


class FxFuseWarning(UserWarning):
    """Something the user should know that does not stop fxfuse: a part run unfused, a rewrite
    rolled back. Shown once per cause, without any logging set up."""


def warn(message: str, stacklevel: int = 3) -> None:
    """Warn the user (:class:`FxFuseWarning`; Python shows it once per place it is raised)."""
    import warnings

    warnings.warn(message, FxFuseWarning, stacklevel=stacklevel)


class CaptureError(FxFuseError):
    """Nothing in the model could be captured as a graph.

    ``message`` is one line naming the construct and where it is; ``hint`` is what to try from
    Python, ``cli_hint`` what to try on the command line (``str(error)`` shows the message and
    the Python hint).
    """

    def __init__(self, message: str, *, hint: str = "", cli_hint: str = ""):
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.cli_hint = cli_hint or hint

    def __str__(self) -> str:
        return f"{self.message}\n  hint: {self.hint}" if self.hint else self.message


class TrainingModeError(FxFuseError, ValueError):
    """The model is in training mode, where batch norm and dropout have no fixed form."""


class ConvergenceError(FxFuseError, RuntimeError):
    """A rule set kept firing past its bound: a bug in a rule, never a property of the model."""


class NondeterministicError(FxFuseError, ValueError):
    """The reference gives different outputs for the same input (dropout in training mode, a
    random op): there is no single function to compare a candidate with."""


class VerificationError(FxFuseError, AssertionError):
    """A candidate computes something other than its reference, on the input it carries.

    Raised by :func:`fxfuse.verify` with the shrunk counterexample: ``inputs`` (the tensors),
    ``input_shapes``, ``distribution`` and ``channels_last`` (how the values were drawn),
    ``seed`` (the verifier's), ``output`` (which output differs, e.g. ``output[1]['logits']``),
    ``kind`` (``"mismatch"``, ``"non-finite"``, ``"shape"``, ``"structure"``, ``"raised"``),
    ``error`` (the normalised error ``‖Δ‖/‖ref‖``, where one applies) and ``tolerance``.
    """

    def __init__(
        self,
        message: str,
        *,
        kind: str = "mismatch",
        output: str = "output",
        error: float | None = None,
        tolerance: float | None = None,
        inputs: Sequence[Any] = (),
        distribution: str | None = None,
        channels_last: bool = False,
        seed: int | None = None,
    ):
        super().__init__(message)
        self.kind = kind
        self.output = output
        self.error = error
        self.tolerance = tolerance
        self.inputs = tuple(inputs)
        self.distribution = distribution
        self.channels_last = channels_last
        self.seed = seed

    @property
    def input_shapes(self) -> tuple[tuple[int, ...] | None, ...]:
        """The shape of each input (``None`` for an input that is not a tensor)."""
        return tuple(tuple(x.shape) if hasattr(x, "shape") else None for x in self.inputs)
