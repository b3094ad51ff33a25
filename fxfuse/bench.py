"""Side by side: one model's latency as eager, as fxfuse fuses it, and as the other tools do.

:func:`compare` builds every :data:`VARIANTS` entry that applies to the model, then times them
**in one process, interleaved** (each round runs every variant once, in a rotating order, so
drift in clock speed or cache state hits all of them alike) and reports the median of the
rounds. It also records how long each conversion or compilation took (fxfuse's split into
capture, rules, emit and verification), how many convolutions and batch norms each variant
really executes (``torch.profiler``, which sees inside compiled code) and each variant's
normalised error against the eager model.

The variants:

====================  ======================================================================
``eager``             the training-time structure as written (eval mode)
``fxfuse``            :func:`fxfuse.optimize`
``timm``              ``timm.utils.model.reparameterize_model`` (timm models only)
``fx.fuse``           ``torch.fx.experimental.optimization.fuse`` (conv + bn modules)
``jit.freeze``        ``torch.jit.trace`` → ``freeze`` → ``optimize_for_inference``
``inductor``          ``torch.compile`` with Inductor and freezing, on the unfused model
``fxfuse+inductor``   ``torch.compile(backend="fxfuse", options={"inner": "inductor"})``
====================  ======================================================================

A variant that does not apply (timm's converter on a torchvision model, the fxfuse backend
before it is installed) is reported as unavailable with the reason; one that raises is
reported as failed with its error. Neither stops the others.
"""

from __future__ import annotations

import copy
import logging
import platform
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

import fxfuse
from fxfuse.compare import ieee_float32, tolerance_for
from fxfuse.console import format_seconds, native_stderr_to_log, progress, table
from fxfuse.testing import count_ops_profiled, relative_error

__all__ = [
    "VARIANTS",
    "Built",
    "Comparison",
    "Measurement",
    "Variant",
    "compare",
    "environment",
    "speed",
]

log = logging.getLogger("fxfuse")


@dataclass
class Built:
    """A variant's runnable model. ``lazy``: it compiles on its first call (torch.compile),
    so that call is the conversion. ``phases``: seconds per conversion phase, where known."""

    fn: Callable[..., Any]
    phases: dict[str, float] = field(default_factory=dict)
    lazy: bool = False


@dataclass(frozen=True)
class Variant:
    """One way to run a model: ``build`` makes the runnable, ``unavailable`` says why it
    cannot apply to a model (``None`` when it can). ``check``, where given, verifies the
    first build against the model; it is timed as the ``verify`` phase, apart from the
    conversion time."""

    name: str
    description: str
    build: Callable[[nn.Module, tuple[Tensor, ...]], Built]
    unavailable: Callable[[nn.Module], str | None] = lambda model: None
    check: Callable[[nn.Module, Callable[..., Any], tuple[Tensor, ...]], None] | None = None


@dataclass
class Measurement:
    """What :func:`compare` measured for one variant. Times in seconds, latency in ms.

    ``status`` is ``"ok"``, ``"unavailable"`` or ``"failed"`` (``reason`` says why).
    ``convert_s`` is the median conversion time (for a lazy variant, its first call).
    ``latency_ms`` is the median over rounds; ``spread_ms`` the quartiles.
    """

    variant: str
    status: str
    reason: str = ""
    convert_s: float | None = None
    phases: dict[str, float] = field(default_factory=dict)
    latency_ms: float | None = None
    spread_ms: tuple[float, float] | None = None
    rounds: int = 0
    convs: int | None = None
    batch_norms: int | None = None
    error: float | None = None


# -- the variants ------------------------------------------------------------------------------


def _eager(model: nn.Module, inputs: tuple[Tensor, ...]) -> Built:
    return Built(model)


def _fxfuse(model: nn.Module, inputs: tuple[Tensor, ...]) -> Built:
    fused = fxfuse.optimize(model)
    return Built(fused, dict(fused.fxfuse_report.timings))


def _verify(model: nn.Module, fused: Callable[..., Any], inputs: tuple[Tensor, ...]) -> None:
    """fxfuse's verifier where it exists (fxfuse.verify), else one differential check."""
    verify = getattr(fxfuse, "verify", None)
    if verify is not None:
        verify(model, fused, example_inputs=inputs)
        return
    with torch.no_grad():
        error = relative_error(model(*inputs), fused(*inputs))
    dtype = next((p.dtype for p in model.parameters()), torch.float32)
    if error > tolerance_for(dtype):
        raise AssertionError(f"fused model differs from the original: error {error:.2e}")


def _is_timm(model: nn.Module) -> str | None:
    if not type(model).__module__.startswith("timm."):
        return "not a timm model"
    try:
        from timm.utils.model import reparameterize_model  # noqa: F401
    except ImportError:
        return "timm is not installed"
    return None


def _timm(model: nn.Module, inputs: tuple[Tensor, ...]) -> Built:
    from timm.utils.model import reparameterize_model

    return Built(reparameterize_model(model))  # inplace=False: it converts a deep copy


def _fx_fuse(model: nn.Module, inputs: tuple[Tensor, ...]) -> Built:
    from torch.fx.experimental.optimization import fuse

    return Built(fuse(model))


def _jit_freeze(model: nn.Module, inputs: tuple[Tensor, ...]) -> Built:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # torch.jit is deprecated; it is the baseline here
        traced = torch.jit.trace(model, inputs, strict=False)
        frozen = torch.jit.freeze(traced.eval())
        return Built(torch.jit.optimize_for_inference(frozen))


def _inductor(model: nn.Module, inputs: tuple[Tensor, ...]) -> Built:
    return Built(torch.compile(copy.deepcopy(model), options={"freezing": True}), lazy=True)


def _fxfuse_backend_missing(model: nn.Module) -> str | None:
    if "fxfuse" not in torch._dynamo.list_backends():
        return "the torch.compile backend 'fxfuse' is not registered in this install"
    return None


def _fxfuse_inductor(model: nn.Module, inputs: tuple[Tensor, ...]) -> Built:
    compiled = torch.compile(copy.deepcopy(model), backend="fxfuse", options={"inner": "inductor"})
    return Built(compiled, lazy=True)


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("eager", "training-time model as written", _eager),
        Variant("fxfuse", "fxfuse.optimize", _fxfuse, check=_verify),
        Variant("timm", "timm reparameterize_model", _timm, _is_timm),
        Variant("fx.fuse", "torch.fx.experimental.optimization.fuse", _fx_fuse),
        Variant("jit.freeze", "torch.jit trace + freeze + optimize_for_inference", _jit_freeze),
        Variant("inductor", "torch.compile (Inductor, freezing) on the unfused model", _inductor),
        Variant(
            "fxfuse+inductor",
            'torch.compile(backend="fxfuse", inner inductor)',
            _fxfuse_inductor,
            _fxfuse_backend_missing,
        ),
    )
}

# Conversions that are cheap enough to repeat for a median; compilers are timed once (a second
# compile of the same model would hit their caches).
_REPEATABLE = ("fxfuse", "timm", "fx.fuse")


# -- measuring ---------------------------------------------------------------------------------


@dataclass
class Comparison:
    """:func:`compare`'s result: the measurements and the conditions they were taken in."""

    spec: str
    input_shape: tuple[int, ...]
    environment: dict[str, Any]
    measurements: list[Measurement]

    def get(self, variant: str) -> Measurement | None:
        return next((m for m in self.measurements if m.variant == variant), None)

    def latency_ratio(self, variant: str, baseline: str) -> float | None:
        """``variant``'s median latency over ``baseline``'s (``None`` if either is missing)."""
        a, b = self.get(variant), self.get(baseline)
        if a is None or b is None or a.latency_ms is None or not b.latency_ms:
            return None
        return a.latency_ms / b.latency_ms

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self) -> str:
        """The side-by-side table, one row per variant."""
        rows = [
            ["variant", "latency ms", "speed vs eager", "convs run", "BNs run", "error", "convert"]
        ]
        notes = []
        for m in self.measurements:
            if m.status != "ok":
                rows.append([m.variant, m.status] + ["-"] * 5)
                notes.append(f"  {m.variant}: {_short(m.reason, 90)}")
                continue
            eager = self.get("eager")
            rows.append(
                [
                    m.variant,
                    f"{m.latency_ms:.2f}" if m.latency_ms is not None else "-",
                    speed(m.latency_ms, eager.latency_ms if eager else None)
                    if m.variant != "eager"
                    else "-",
                    _count(m.convs),
                    _count(m.batch_norms),
                    f"{m.error:.1e}" if m.error is not None else "-",
                    format_seconds(m.convert_s) if m.variant != "eager" else "-",
                ]
            )
        shape = "x".join(map(str, self.input_shape))
        env = self.environment
        title = (
            f"{self.spec} on {shape}, {env['device']}, {env['threads']} threads, "
            f"median of {self.rounds()} interleaved rounds"
        )
        return "\n".join([table(rows, title=title), *notes])

    def rounds(self) -> int:
        return max((m.rounds for m in self.measurements), default=0)


def speed(latency_ms: float | None, baseline_ms: float | None) -> str:
    """``latency_ms`` against ``baseline_ms`` in words: ``1.25× faster``, ``1.10× slower``
    (within 1%: ``as fast``); ``-`` when either is missing."""
    if latency_ms is None or not baseline_ms or not latency_ms:
        return "-"
    ratio = baseline_ms / latency_ms
    if abs(ratio - 1) < 0.01:
        return "as fast"
    return f"{ratio:.2f}× faster" if ratio > 1 else f"{1 / ratio:.2f}× slower"


def _short(text: str, width: int = 60) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= width else line[: width - 1] + "…"


def _count(value: int | None) -> str:
    return "?" if value is None else str(value)


def environment(device: torch.device | str = "cpu") -> dict[str, Any]:
    """The machine and library versions a measurement was taken with."""
    device = torch.device(device)
    env: dict[str, Any] = {
        "device": str(device),
        "device_name": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "cpus": _cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "fxfuse": fxfuse.__version__,
        "platform": platform.platform(),
    }
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
        env["tf32"] = "off while measuring"
    try:
        import timm

        env["timm"] = timm.__version__
    except ImportError:
        pass
    return env


def _cpu_count() -> int | None:
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _call(fn: Callable[..., Any], inputs: tuple[Tensor, ...], device: torch.device) -> Any:
    with torch.no_grad():
        out = fn(*inputs)
    _sync(device)
    return out


def _build(
    variant: Variant,
    model: nn.Module,
    inputs: tuple[Tensor, ...],
    device: torch.device,
) -> tuple[Built, float]:
    """Build ``variant`` once and return it with its conversion time (compile = first call)."""
    _sync(device)
    start = time.perf_counter()
    built = variant.build(model, inputs)
    if built.lazy:
        _call(built.fn, inputs, device)
    _sync(device)
    return built, time.perf_counter() - start


def compare(
    model: nn.Module,
    inputs: Sequence[Tensor],
    *,
    spec: str = "model",
    variants: Sequence[str] | None = None,
    rounds: int = 20,
    warmup: int = 3,
    convert_repeats: int = 3,
    show_progress: bool = True,
) -> Comparison:
    """Measure ``model`` under each variant; see the module docstring.

    ``model`` must be in eval mode on the device to measure on (its first parameter's device;
    CPU for a model without parameters), with ``inputs`` on the same device. It is not
    modified: every converter works on a copy or builds a new module. On CUDA, TensorFloat-32
    is off for the whole comparison (every variant computes in full float32).
    """
    with ieee_float32():
        return _compare(
            model, tuple(inputs), spec, variants, rounds, warmup, convert_repeats, show_progress
        )


def _compare(
    model: nn.Module,
    inputs: tuple[Tensor, ...],
    spec: str,
    variants: Sequence[str] | None,
    rounds: int,
    warmup: int,
    convert_repeats: int,
    show_progress: bool,
) -> Comparison:
    if model.training:
        raise fxfuse.TrainingModeError("compare() measures inference: call model.eval() first")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    names = list(variants) if variants is not None else list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    if "eager" not in names:
        names.insert(0, "eager")  # every ratio and error is against eager

    measurements: dict[str, Measurement] = {}
    runnable: dict[str, Callable[..., Any]] = {}
    reference = _call(model, inputs, device)
    builds: dict[str, list[tuple[Built, float]]] = {}
    steps = progress(names, "converting", enabled=show_progress, lines=True, label=str)
    for name in steps:
        variant = VARIANTS[name]
        why = variant.unavailable(model)
        if why is not None:
            measurements[name] = Measurement(name, "unavailable", why)
            continue
        try:
            built, seconds = _build(variant, model, inputs, device)
            output = _call(built.fn, inputs, device)
            if variant.check is not None:
                start = time.perf_counter()
                variant.check(model, built.fn, inputs)
                built.phases["verify"] = time.perf_counter() - start
        except Exception as error:  # a baseline that breaks is a finding, not a crash
            log.debug("%s failed", name, exc_info=True)
            measurements[name] = Measurement(name, "failed", f"{type(error).__name__}: {error}")
            continue
        builds[name] = [(built, seconds)]
        with native_stderr_to_log():  # the profiler's own noise stays off the progress bar
            counts = count_ops_profiled(built.fn, *inputs)
        measurements[name] = Measurement(
            name,
            "ok",
            convs=counts["conv"],
            batch_norms=counts["batch_norm"],
            error=relative_error(reference, output),
        )
        runnable[name] = built.fn

    # More conversions of the cheap converters, interleaved like the latency rounds, so a
    # noisy moment on the machine does not land on one converter only.
    repeatable = [n for n in builds if n in _REPEATABLE]
    for _ in range(convert_repeats - 1):
        for name in repeatable:
            builds[name].append(_build(VARIANTS[name], model, inputs, device))
    for name, runs in builds.items():
        m = measurements[name]
        m.convert_s = statistics.median(s for _, s in runs) if name != "eager" else 0.0
        m.phases = _median_phases([b.phases for b, _ in runs])

    samples = _interleave(runnable, inputs, device, rounds, warmup, show_progress)
    for name, times in samples.items():
        m = measurements[name]
        q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
        m.latency_ms = statistics.median(times) * 1e3
        m.spread_ms = (q[0] * 1e3, q[2] * 1e3)
        m.rounds = len(times)
    return Comparison(
        spec,
        tuple(inputs[0].shape) if inputs else (),
        environment(device),
        [measurements[n] for n in names],
    )


def _median_phases(runs: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(run[key] for run in runs if key in run) for key in runs[0]}


def _interleave(
    runnable: dict[str, Callable[..., Any]],
    inputs: tuple[Tensor, ...],
    device: torch.device,
    rounds: int,
    warmup: int,
    show_progress: bool,
) -> dict[str, list[float]]:
    """Seconds per call of each runnable, one sample per round, rotating the order each round."""
    names = list(runnable)
    for _ in range(warmup):
        for name in names:
            _call(runnable[name], inputs, device)
    samples: dict[str, list[float]] = {name: [] for name in names}
    steps = progress(range(rounds), "timing round", total=rounds, enabled=show_progress, lines=True)
    for r in steps:
        shift = r % len(names) if names else 0
        for name in names[shift:] + names[:shift]:
            fn = runnable[name]
            start = time.perf_counter()
            _call(fn, inputs, device)
            samples[name].append(time.perf_counter() - start)
    return samples
