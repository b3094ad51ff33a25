"""Exceptions fxfuse raises. Each message names the construct and says what to try."""

from __future__ import annotations

__all__ = ["CaptureError", "ConvergenceError", "FxFuseError", "TrainingModeError"]


class FxFuseError(Exception):
    """Base class of every error fxfuse raises on purpose."""


class CaptureError(FxFuseError):
    """The model could not be captured as a graph; the message says where and what to try."""


class TrainingModeError(FxFuseError, ValueError):
    """The model is in training mode, where batch norm and dropout have no fixed form."""


class ConvergenceError(FxFuseError, RuntimeError):
    """A rule set kept firing past its bound: a bug in a rule, never a property of the model."""
