"""The ``fxfuse`` command line: fuse a model without writing code.

::

    fxfuse optimize [SPEC] [--input-shape 1,3,224,224] [--verify N] [--save out.pt2|out.onnx]
    fxfuse inspect SPEC     # the re-parameterizable structures found; nothing is changed
    fxfuse bench SPEC       # latency side by side: eager, fxfuse, timm, fx, jit, Inductor
    fxfuse convert train.pt --model SPEC --into SPEC   # a deploy class's state_dict

SPEC is ``builtin:NAME``, ``torchvision:NAME``, ``timm:NAME``, ``path/to/file.py:factory`` or
``package.module:factory``, optionally with literal arguments, ``file.py:make(deploy=True)``
(:mod:`fxfuse.models`). ``fxfuse optimize`` with no SPEC fuses the built-in training-time
network (:func:`fxfuse.zoo.training_time_net`), checks it against the original and prints what
changed: the README's main job. ``fxfuse`` alone prints this help and exits 0. Errors are one
line and a hint (exit 2); ``--debug``, before or after the command, shows the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import re
import sys
import textwrap
import time
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.fx import Graph, GraphModule, Node
from torch.nn.modules.conv import _ConvNd

import fxfuse
from fxfuse.compare import tolerance_for
from fxfuse.console import format_seconds, progress, table
from fxfuse.errors import FxFuseError
from fxfuse.models import LoadedModel, SpecError, load_model
from fxfuse.report import op_kind
from fxfuse.testing import (
    count_flops,
    count_ops,
    randomize_batch_norms,
    relative_error,
)

__all__ = ["build_parser", "main"]

log = logging.getLogger("fxfuse")

DEFAULT_SPEC = "builtin:training_time_net"


class UsageError(FxFuseError):
    """A mistake on the command line: printed as one line and a hint, no traceback."""

    def __init__(self, message: str, hint: str = ""):
        super().__init__(message)
        self.hint = hint


# -- shared steps ------------------------------------------------------------------------------


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError as error:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated ints like 1,3,224,224, got {text!r}"
        ) from error
    if not shape or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"every size must be positive, got {text!r}")
    return shape


def _at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: a whole number no smaller than ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from error
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def _load(args: argparse.Namespace, spec: str | None = None) -> tuple[LoadedModel, tuple[int, ...]]:
    """The model the spec names, its batch norms randomized where its weights are random."""
    torch.manual_seed(args.seed)
    loaded = load_model(spec or args.spec)
    if loaded.random_weights or args.randomize_bn:
        randomize_batch_norms(loaded.model, args.seed)
    shape = args.input_shape or loaded.input_shape
    return loaded, shape


def _note_mode(loaded: LoadedModel) -> None:
    """Say so when a user's factory returned a training-mode model: the command line runs it
    in eval mode (where the Python API would raise ``TrainingModeError``)."""
    if loaded.was_training:
        print(
            f"note: {loaded.spec} returned the model in training mode; fxfuse switched it to "
            "eval mode (batch norms use their running statistics, dropout is off)"
        )


def _describe(loaded: LoadedModel, shape: tuple[int, ...], randomized: bool) -> str:
    weights = "random weights" if loaded.random_weights else "its own weights"
    stats = ", random batch-norm statistics" if randomized else ""
    return f"{loaded.spec} ({weights}{stats}), input {'x'.join(map(str, shape))}"


def _inputs(shape: tuple[int, ...], n: int, seed: int) -> list[Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator) for _ in range(n)]


def _first_input_error(model: nn.Module, x: Tensor) -> None:
    """Run the original once, so a wrong ``--input-shape`` is reported as such."""
    try:
        with torch.no_grad():
            model(x)
    except Exception as error:
        raise UsageError(
            f"the model does not accept an input of shape {tuple(x.shape)}: "
            f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}",
            _shape_hint(model, tuple(x.shape)),
        ) from error


def _shape_hint(model: nn.Module, rejected: tuple[int, ...]) -> str:
    """What to pass as ``--input-shape``, read off the model's first conv or linear layer
    (never the shape it just rejected)."""
    for name, module in model.named_modules():
        if isinstance(module, _ConvNd):
            dims = len(module.kernel_size)
            form = "N,C," + {1: "L", 2: "H,W", 3: "D,H,W"}.get(dims, ",".join(["S"] * dims))
            example = (1, module.in_channels, *[32] * dims)
            layer = f"its first conv ('{name}') is {dims}-d with {module.in_channels} channels in"
            break
        if isinstance(module, nn.Linear):
            form, example = "N,F", (1, module.in_features)
            layer = f"its first linear layer ('{name}') takes {module.in_features} features"
            break
    else:
        return "give the right one with --input-shape N,C,H,W (the sizes its forward takes)"
    shown = ",".join(map(str, example))
    also = f", e.g. --input-shape {shown}" if example != rejected else ""
    return f"give the right one with --input-shape {form}{also} ({layer})"


def _median_ms(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e3


def _flops(value: int) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.2f} {unit}"
    return str(value)


def _fuse(model: nn.Module, x: Tensor | None, debug: bool, equalize: bool = False) -> GraphModule:
    """``fxfuse.optimize``, with what torch prints to stderr held back until it succeeds.

    When symbolic tracing fails and the ``torch.export`` fallback fails too, torch prints the
    partial graph it had before raising; fxfuse's error already says where and what to try,
    so that dump is shown with ``--debug`` only.
    """
    example = None if x is None else (x,)
    if debug:
        return fxfuse.optimize(model, example_inputs=example, equalize=equalize)
    held = io.StringIO()
    with contextlib.redirect_stderr(held):
        fused = fxfuse.optimize(model, example_inputs=example, equalize=equalize)
    sys.stderr.write(held.getvalue())  # warnings of a run that worked still reach the user
    return fused


# -- fxfuse optimize ---------------------------------------------------------------------------


def run_optimize(args: argparse.Namespace) -> int:
    if args.save is not None:
        _check_save_path(args.save)  # before any work, not after it
    loaded, shape = _load(args)
    model = loaded.model
    inputs = _inputs(shape, args.verify, args.seed)
    randomized = loaded.random_weights or args.randomize_bn
    print(f"fxfuse optimize {_describe(loaded, shape, randomized)}")
    _note_mode(loaded)
    _first_input_error(model, inputs[0])
    fused = _fuse(model, inputs[0], args.debug, args.equalize)
    print(fused.fxfuse_report)
    if args.quant_report:
        print(fxfuse.quant_report(fused))

    with torch.no_grad():
        worst = 0.0
        for x in progress(inputs, "verifying", enabled=not args.quiet):
            worst = max(worst, relative_error(model(x), fused(x)))
        before, after = count_ops(model, inputs[0]), count_ops(fused, inputs[0])
        flops = count_flops(model, inputs[0]), count_flops(fused, inputs[0])
        eager = _median_ms(lambda: model(inputs[0]), args.repeats)
        fast = _median_ms(lambda: fused(inputs[0]), args.repeats)
    params = (
        sum(p.numel() for p in model.parameters()),
        sum(p.numel() for p in fused.parameters()),
    )
    print()
    print(
        table(
            [
                ("executed on input " + "x".join(map(str, shape)), "original", "fused"),
                ("convolutions", str(before["conv"]), str(after["conv"])),
                ("batch norms", str(before["batch_norm"]), str(after["batch_norm"])),
                (
                    "aten ops",
                    str(sum(v for k, v in before.items() if k not in ("conv", "batch_norm"))),
                    str(sum(v for k, v in after.items() if k not in ("conv", "batch_norm"))),
                ),
                ("parameters", f"{params[0]:,}", f"{params[1]:,}"),
                ("FLOPs (conv, matmul)", _flops(flops[0]), _flops(flops[1])),
                (f"latency, median of {args.repeats} (ms)", f"{eager:.2f}", f"{fast:.2f}"),
            ]
        )
    )
    dtype = next((p.dtype for p in model.parameters()), torch.float32)
    tolerance = tolerance_for(dtype)
    verdict = "ok" if worst <= tolerance else "MISMATCH"
    print(
        f"\nworst normalised error over {len(inputs)} inputs: {worst:.2e} "
        f"(tolerance {tolerance:g}): {verdict}"
    )
    if args.save is not None:
        shapes = _save(fused, inputs[0], args.save, static=args.static_shapes)
        print(f"saved the fused model to {args.save}: {shapes}")
    return 0 if worst <= tolerance else 1


# -- saving: torch.export archives and ONNX ----------------------------------------------------


def _check_save_path(path: Path) -> None:
    """Everything ``--save`` needs, checked before the model is even built."""
    suffix = path.suffix.lower()
    if suffix not in _SAVERS:
        raise UsageError(f"cannot save as {path.name!r}", "use a .pt2 or .onnx file name")
    folder = path.parent
    if not folder.is_dir():
        raise UsageError(f"cannot save to {path}: the folder {folder} does not exist", "create it")
    if path.is_dir() or not os.access(folder, os.W_OK):
        raise UsageError(f"cannot write {path}", "choose a file in a folder you can write to")
    if suffix == ".onnx":
        missing = [name for name in ("onnx", "onnxscript") if not _importable(name)]
        if missing:
            raise UsageError(
                f"saving as ONNX needs {' and '.join(missing)} (not installed)",
                "pip install 'fxfuse[onnx]'",
            )


def _importable(name: str) -> bool:
    try:
        __import__(name)
    except ImportError:
        return False
    return True


def _dynamic_dims(x: Tensor) -> dict[int, Any]:
    """Every dim of the input but the channels may vary: batch and spatial sizes."""
    return {i: torch.export.Dim.AUTO for i in range(x.dim()) if i != 1}


def _export(fused: GraphModule, x: Tensor, static: bool) -> tuple[Any, str]:
    """``fused`` as an ``ExportedProgram`` and a sentence saying which input sizes it takes.

    By default the batch and spatial dims are dynamic where the model allows (a flatten before
    a linear layer fixes the spatial ones); the program is exported on a batch of two, since
    torch.export fixes any dim that is 1 in its example.
    """
    shape = "x".join(map(str, x.shape))
    if not static:
        example = x.expand(2, *x.shape[1:]).contiguous() if x.shape[0] == 1 else x
        try:
            program = torch.export.export(fused, (example,), dynamic_shapes=(_dynamic_dims(x),))
        except Exception as error:
            log.debug("dynamic export failed", exc_info=True)
            program = torch.export.export(fused, (x,))
            why = str(error).strip().splitlines()[0][:100] if str(error).strip() else ""
            return program, f"input fixed at {shape} (a dynamic export failed: {why})"
        return program, _describe_dims(program, x)
    return torch.export.export(fused, (x,)), f"input fixed at {shape} (--static-shapes)"


_DIM_NAMES = {0: "batch", 1: "channels", 2: "height", 3: "width"}
_DIM_LETTERS = {0: "N", 1: "C", 2: "H", 3: "W"}


def _describe_dims(program: Any, x: Tensor) -> str:
    """Which input dims of ``program`` vary and which are fixed, and any relation the model
    imposes between them (a flatten before a linear layer: ``4*H*W == 256``)."""
    placeholder = [n for n in program.graph.nodes if n.op == "placeholder"][-1]
    dynamic, fixed = [], []
    for i, size in enumerate(placeholder.meta["val"].shape):
        name = _DIM_NAMES.get(i, f"dim {i}") if x.dim() == 4 else f"dim {i}"
        if isinstance(size, int):
            fixed.append(f"{name} {size}")
        else:
            dynamic.append(name)
    text = f"{', '.join(dynamic)} dynamic" if dynamic else "every dim fixed"
    text += f"; fixed: {', '.join(fixed)}" if fixed else ""
    # torch keeps the relations it could not turn into ranges as guard expressions
    letters = _DIM_LETTERS if x.dim() == 4 else {}
    for guard in getattr(program, "_guards_code", None) or []:
        readable = re.sub(
            r"L\['[^']+'\]\.size\(\)\[(\d+)\]",
            lambda m: letters.get(int(m[1]), f"dim{m[1]}"),
            str(guard),
        )
        if readable.count("(") == 1:  # only the parentheses around one side
            readable = readable.replace("(", "").replace(")", "")
        text += f"; the model requires {readable}"
    return text


def _save_pt2(program: Any, path: Path) -> None:
    torch.export.save(program, str(path))


def _save_onnx(program: Any, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        onnx_program = torch.onnx.export(program, dynamo=True, verbose=False)
    assert onnx_program is not None
    onnx_program.save(str(path))


_SAVERS: dict[str, Callable[[Any, Path], None]] = {
    ".pt2": _save_pt2,  # torch.export archive: loads without the model's source code
    ".onnx": _save_onnx,
}


def _save(fused: GraphModule, x: Tensor, path: Path, *, static: bool = False) -> str:
    """Write ``fused`` as a ``torch.export`` archive (.pt2) or an ONNX model (.onnx); returns
    which input sizes the saved model takes."""
    program, shapes = _export(fused, x, static)
    _SAVERS[path.suffix.lower()](program, path)
    return shapes


# -- fxfuse inspect ----------------------------------------------------------------------------


def _conv_counts(model: nn.Module) -> dict[str, int]:
    """How many conv modules each submodule of ``model`` holds, by path."""
    counts: dict[str, int] = Counter()
    for path, module in model.named_modules():
        if isinstance(module, _ConvNd):
            parts = path.split(".")
            for i in range(len(parts)):
                counts[".".join(parts[:i])] += 1
    return counts


def _block_of(node: Node, convs: dict[str, int]) -> tuple[str, str]:
    """The block a node belongs to: the innermost user-level module (one not from
    ``torch.nn``) around it that holds at least two convs. A conv-bn wrapper alone is not a
    block; the RepVGG, MobileOne or ResNet block it sits in is. ``("", "")``: the top level."""
    stack = node.meta.get("nn_module_stack") or {}
    block, cls = "", ""
    for path, klass in stack.values():
        module = getattr(klass, "__module__", "") or ""
        if not module.startswith("torch.nn") and convs.get(str(path), 0) >= 2:
            block, cls = str(path), getattr(klass, "__name__", str(klass))
    return block, cls


def _ops_by_block(
    graph: Graph, module: Callable[[str], nn.Module], convs: dict[str, int]
) -> dict[str, Counter[str]]:
    counts: dict[str, Counter[str]] = defaultdict(Counter)
    for node in graph.nodes:
        kind = op_kind(node, module)
        if kind in ("conv", "bn"):
            counts[_block_of(node, convs)[0]][kind] += 1
    return counts


def run_inspect(args: argparse.Namespace) -> int:
    """List the structures fxfuse would rewrite, block by block; the model is not changed.

    fxfuse runs its rules on its own copy of the graph (the model is never modified), so the
    honest answer to "what would change" is what they do there: per block, the convs and
    batch norms before and after, the rules that fire and the ones that decline, and why.
    """
    from fxfuse.capture import SYMBOLIC, symbolic_capture

    loaded, shape = _load(args)
    model = loaded.model
    print(f"fxfuse inspect {loaded.spec}")
    _note_mode(loaded)
    x: Tensor | None = _inputs(shape, 1, args.seed)[0]
    try:
        _first_input_error(model, x)  # type: ignore[arg-type]
    except UsageError:
        if args.input_shape is not None:
            raise
        print(f"(the model rejects the default input {'x'.join(map(str, shape))}: captured "
              "without an example; --input-shape gives one)")  # fmt: skip
        x = None
    fused = _fuse(model, x, args.debug)  # the route `fxfuse optimize` takes
    report = fused.fxfuse_report
    print(f"captured with {report.capture}")
    if report.capture != SYMBOLIC:
        print(_parts_table(report, args.max_declines))
        _print_totals(report, args.spec)
        return 0
    original = symbolic_capture(model)
    convs = _conv_counts(model)
    where = {node.name: _block_of(node, convs) for node in original.nodes}
    classes = {block: cls for block, cls in where.values()}
    fired: dict[str, Counter[str]] = defaultdict(Counter)
    for rewrite in report.rewrites:
        fired[where.get(rewrite.node, ("", ""))[0]][rewrite.rule] += 1
    declined: dict[str, list[str]] = defaultdict(list)
    for decline in report.declines:
        declined[where.get(decline.node, ("", ""))[0]].append(
            f"{decline.rule} at {decline.node}: {decline.reason}"
        )
    before = _ops_by_block(original, model.get_submodule, convs)
    after = _ops_by_block(fused.graph, fused.get_submodule, convs)
    blocks = [b for b in dict.fromkeys([*before, *fired, *declined]) if fired[b] or declined[b]]
    root = type(model).__name__
    rows = [["block", "class", "convs", "BNs", "→ convs", "BNs", "rules that fire"]]
    for block in blocks:
        rules = ", ".join(
            f"{rule} ×{n}" if n > 1 else rule for rule, n in sorted(fired[block].items())
        )
        rows.append(
            [
                block or "(top level)",
                classes.get(block) or root,
                str(before[block]["conv"]),
                str(before[block]["bn"]),
                str(after[block]["conv"]),
                str(after[block]["bn"]),
                (rules or "-") + (" (declines)" if declined[block] else ""),
            ]
        )
    untouched = sum(1 for b in before if b not in blocks)
    title = f"{len(blocks)} blocks with re-parameterizable structure:"
    print(table(rows, title=title, align="llrrrrl"))
    if untouched:
        print(f"{untouched} other blocks hold convs or batch norms that nothing rewrites")
    declines = [(b, line) for b in blocks for line in declined[b]]
    if declines:
        print(f"\ndeclined ({len(declines)}):")
        for block, line in declines[: args.max_declines]:
            print(f"  {block or '(top level)'}: {line}")
        if len(declines) > args.max_declines:
            print(f"  … and {len(declines) - args.max_declines} more (--max-declines)")
    _print_totals(report, args.spec)
    return 0


def _print_totals(report: fxfuse.FusionReport, spec: str) -> None:
    b, a = report.before, report.after or report.before
    print(
        f"\nin all: convs {b.convs} → {a.convs}, batch norms {b.batch_norms} → {a.batch_norms}, "
        f"parameters {b.parameters:,} → {a.parameters:,}. The model was not changed; "
        f"`fxfuse optimize {spec}` fuses it"
    )


def _parts_table(report: fxfuse.FusionReport, limit: int) -> str:
    """The parts captured as graphs (what their rules did) and the parts kept as Python (why),
    at most ``limit`` of each."""
    fired: dict[str, Counter[str]] = defaultdict(Counter)
    for rewrite in report.rewrites:
        path = rewrite.node.rpartition(":")[0]
        fired[path][rewrite.rule] += 1
    rows = [["part", "class", "convs", "BNs", "→ convs", "BNs", "rules that fire"]]
    every = [p for p in report.parts if p.kind == "graph"]
    graphs = [p for p in every if p.before.convs or p.before.batch_norms or fired[p.path]]
    for part in graphs[:limit]:
        rules = ", ".join(
            f"{rule} ×{n}" if n > 1 else rule for rule, n in sorted(fired[part.path].items())
        )
        b, a = part.before, part.after
        rows.append(
            [part.name, part.module, str(b.convs), str(b.batch_norms), str(a.convs),
             str(a.batch_norms), rules or "-"]
        )  # fmt: skip
    title = f"{len(every)} parts captured as graphs" + (
        f" ({len(every) - len(graphs)} without a conv or batch norm not shown):"
        if len(graphs) < len(every)
        else ":"
    )
    lines = [table(rows, title=title, align="llrrrrl")]
    if len(graphs) > limit:
        lines.append(f"  … and {len(graphs) - limit} more (--max-declines)")
    python = [p for p in report.parts if p.kind == "python"]
    if python:
        lines.append(f"\n{len(python)} parts kept as Python code around them:")
        lines += [
            f"  {p.name} ({p.module}): {p.reason}" + (f" at {p.where}" if p.where else "")
            for p in python[:limit]
        ]
        if len(python) > limit:
            lines.append(f"  … and {len(python) - limit} more (--max-declines)")
    return "\n".join(lines)


# -- fxfuse bench ------------------------------------------------------------------------------


def _device(text: str | None) -> torch.device:
    """The device ``--device`` names, checked before any work (default: CUDA if present)."""
    if text is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError as error:
        raise UsageError(
            f"unknown device {text!r}", "use cpu or cuda (cuda:1 for a second GPU)"
        ) from error
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UsageError(
                f"--device {text}: torch {torch.__version__} sees no CUDA GPU here",
                "use --device cpu, or leave --device out (CUDA when there is one)",
            )
        if device.index is not None and device.index >= count:
            raise UsageError(f"--device {text}: there are {count} CUDA devices", "use cuda:0")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {text}: MPS is not available here", "use --device cpu")
    return device


def run_bench(args: argparse.Namespace) -> int:
    from fxfuse.bench import VARIANTS, compare, speed

    variants = [v.strip() for v in args.variants.split(",")] if args.variants else list(VARIANTS)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise UsageError(
            f"unknown variant {', '.join(unknown)}", f"choose from {', '.join(VARIANTS)}"
        )
    device = _device(args.device)
    loaded, shape = _load(args)
    model = loaded.model.to(device)
    x = _inputs(shape, 1, args.seed)[0].to(device)
    randomized = loaded.random_weights or args.randomize_bn
    print(f"fxfuse bench {_describe(loaded, shape, randomized)}", flush=True)
    _note_mode(loaded)
    _first_input_error(model, x)
    result = compare(
        model,
        (x,),
        spec=loaded.spec,
        variants=variants,
        rounds=args.rounds,
        warmup=args.warmup,
        show_progress=not args.quiet,
    )
    print(result.table())
    fx = result.get("fxfuse")
    if fx is not None and fx.status == "ok":
        phases = dict(fx.phases)
        verify = phases.pop("verify", None)
        parts = ", ".join(f"{k} {format_seconds(v)}" for k, v in phases.items())
        print(f"fxfuse conversion: {format_seconds(fx.convert_s)} ({parts})")
        if verify is not None:
            print(
                f"fxfuse.verify, after the conversion and not part of it: {format_seconds(verify)}"
            )
        against = [
            f"{speed(fx.latency_ms, other.latency_ms)} than {other.variant}"
            for other in result.measurements
            if other.variant != "fxfuse" and other.status == "ok"
        ]
        if against and fx.latency_ms is not None:
            print(f"fxfuse ({fx.latency_ms:.2f} ms): {', '.join(against)}")
    if args.json is not None:
        args.json.write_text(json.dumps(result.to_dict(), indent=2, default=str))
        print(f"wrote {args.json}")
    return 0


# -- fxfuse convert ----------------------------------------------------------------------------


def _load_checkpoint(model: nn.Module, args: argparse.Namespace, spec: str) -> None:
    """Load ``args.checkpoint`` into ``model`` strictly; a mismatch is the user's to fix."""
    from fxfuse.deploy import read_checkpoint

    if not args.checkpoint.is_file():
        raise UsageError(f"no such file: {args.checkpoint}", "give the training checkpoint")
    state = read_checkpoint(str(args.checkpoint), args.key)
    missing, unexpected = _key_differences(model, state)
    if missing or unexpected:
        parts = [f"{len(missing)} missing keys ({_first(missing)})"] if missing else []
        parts += [f"{len(unexpected)} unexpected keys ({_first(unexpected)})"] if unexpected else []
        raise UsageError(
            f"{args.checkpoint} does not fit {spec}: {', '.join(parts)}",
            "--model must build the training-time network the checkpoint was saved from",
        )
    model.load_state_dict(state, strict=True)


def _key_differences(model: nn.Module, state: dict[str, Tensor]) -> tuple[list[str], list[str]]:
    expected = model.state_dict()
    return [k for k in expected if k not in state], [k for k in state if k not in expected]


def _first(keys: list[str]) -> str:
    return ", ".join(keys[:3]) + (", …" if len(keys) > 3 else "")


def run_convert(args: argparse.Namespace) -> int:
    """Training checkpoint → the deploy model's state_dict, checked, saved."""
    from fxfuse.deploy import deploy_state_dict

    output = args.output or args.checkpoint.with_name(args.checkpoint.stem + "_deploy.pt")
    if not output.parent.is_dir():
        raise UsageError(f"cannot save to {output}: the folder does not exist", "create it")
    loaded, shape = _load(args, args.model)
    model = loaded.model
    print(f"fxfuse convert {args.checkpoint} with {loaded.spec} into {args.into}")
    _note_mode(loaded)
    _load_checkpoint(model, args, loaded.spec)
    deploy = load_model(args.into)
    inputs = _inputs(shape, args.verify, args.seed)
    _first_input_error(model, inputs[0])
    fused = _fuse(model, inputs[0], args.debug)
    state = deploy_state_dict(fused, deploy.model, (inputs[0],))
    deployed = deploy.model
    deployed.load_state_dict(state, strict=True)
    with torch.no_grad():
        worst = max(relative_error(model(x), deployed(x)) for x in inputs)
    dtype = next((p.dtype for p in model.parameters()), torch.float32)
    tolerance = tolerance_for(dtype)
    before, after = count_ops(model, inputs[0]), count_ops(deployed, inputs[0])
    print(
        f"paired every layer of the fused model with {type(deployed).__name__}'s by structure: "
        f"convolutions {before['conv']} → {after['conv']}, batch norms "
        f"{before['batch_norm']} → {after['batch_norm']}"
    )
    verdict = "ok" if worst <= tolerance else "MISMATCH"
    print(
        f"worst normalised error, deploy model against the training model, over {len(inputs)} "
        f"inputs of shape {'x'.join(map(str, shape))}: {worst:.2e} (tolerance {tolerance:g}): "
        f"{verdict}"
    )
    if worst > tolerance:
        return 1
    torch.save(state, output)
    print(
        f"saved {len(state)} entries to {output}; load them with "
        f"model.load_state_dict(torch.load({str(output)!r}))"
    )
    return 0


# -- the parser --------------------------------------------------------------------------------


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's help, wrapped at spaces only: ``jit.freeze`` or a path is never cut in two."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        text = " ".join(text.split())
        return textwrap.wrap(text, width, break_long_words=False, break_on_hyphens=False)


def _model_args(parser: argparse.ArgumentParser, *, default_spec: str | None) -> None:
    if default_spec is None:
        parser.add_argument(
            "spec", help="builtin:NAME, torchvision:NAME, timm:NAME or path/to/file.py:factory"
        )
    else:
        parser.add_argument(
            "spec", nargs="?", default=default_spec, help=f"the model (default {default_spec})"
        )
    parser.add_argument(
        "--input-shape",
        type=_shape,
        default=None,
        metavar="N,C,H,W",
        help="input shape (default: 1,3,64,64 for builtin models, the model's own for timm, "
        "else 1,3,224,224)",
    )
    _common_args(parser)


def _common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--seed", type=int, default=0, help="seed for inputs and statistics (default 0)"
    )
    parser.add_argument(
        "--randomize-bn",
        action="store_true",
        help="randomize batch-norm statistics of a model from a file too (library models "
        "always are: their weights are random anyway)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    _debug_arg(parser, default=argparse.SUPPRESS)


def _verify_arg(parser: argparse.ArgumentParser, default: int) -> None:
    parser.add_argument(
        "--verify",
        type=_at_least(1),
        default=default,
        metavar="N",
        help=f"compare outputs on N random inputs (default {default})",
    )


def _debug_arg(parser: argparse.ArgumentParser, default: Any) -> None:
    # on the main parser and on every command, so `fxfuse optimize X --debug` works as the
    # hints say; SUPPRESS keeps a command's parser from resetting the main one's value
    parser.add_argument(
        "--debug", action="store_true", default=default, help="show tracebacks and debug logs"
    )


def _parser(commands: Any, name: str, help: str, description: str) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = commands.add_parser(
        name, help=help, description=description, formatter_class=_HelpFormatter
    )
    return parser


def _optimize_parser(commands: Any) -> None:
    opt = _parser(
        commands,
        "optimize",
        "fuse a model, verify it, print what changed",
        "Fuse a model, compare it with the original on random inputs and print the report, "
        "the ops that run before and after, and the worst normalised error. Exits 1 on a "
        "mismatch.",
    )
    _model_args(opt, default_spec=DEFAULT_SPEC)
    _verify_arg(opt, default=4)
    opt.add_argument(
        "--save",
        type=Path,
        default=None,
        metavar="PATH",
        help="write the fused model: .pt2 (torch.export) or .onnx; its batch and spatial "
        "sizes stay dynamic where the model allows",
    )
    opt.add_argument(
        "--static-shapes",
        action="store_true",
        help="with --save: fix every input dim at the example's size",
    )
    opt.add_argument(
        "--repeats", type=_at_least(1), default=10, help="latency repeats (default 10)"
    )
    opt.add_argument(
        "--equalize",
        action="store_true",
        help="after fusing, equalize consecutive layers' channel ranges for INT8 (exact)",
    )
    opt.add_argument(
        "--quant-report",
        action="store_true",
        help="print, per fused layer, how its weights fare under symmetric INT8 (per tensor "
        "and per channel)",
    )
    opt.set_defaults(run=run_optimize)


def _inspect_parser(commands: Any) -> None:
    ins = _parser(
        commands,
        "inspect",
        "show the re-parameterizable structures found",
        "List, block by block, what fxfuse would fuse and what it would decline, and why. "
        "The model is not changed.",
    )
    _model_args(ins, default_spec=None)
    ins.add_argument(
        "--max-declines",
        type=_at_least(0),
        default=20,
        help="list at most this many declines (default 20)",
    )
    ins.set_defaults(run=run_inspect)


def _bench_parser(commands: Any) -> None:
    from fxfuse.bench import VARIANTS

    bench = _parser(
        commands,
        "bench",
        "latency side by side: eager, fxfuse, timm, …",
        "Time the model as eager, fused by fxfuse and converted by the other tools, "
        "interleaved in one process.",
    )
    _model_args(bench, default_spec=None)
    bench.add_argument(
        "--variants",
        default=None,
        help=f"comma-separated subset of {', '.join(VARIANTS)} (default all)",
    )
    bench.add_argument(
        "--rounds", type=_at_least(1), default=20, help="interleaved timing rounds (default 20)"
    )
    bench.add_argument(
        "--warmup",
        type=_at_least(0),
        default=3,
        help="untimed calls per variant before timing (default 3)",
    )
    bench.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    bench.add_argument("--json", type=Path, default=None, metavar="PATH", help="write the results")
    bench.set_defaults(run=run_bench)


def _convert_parser(commands: Any) -> None:
    convert = _parser(
        commands,
        "convert",
        "a training checkpoint as a state_dict for your deploy class",
        "Load CHECKPOINT (a state_dict, or a dict holding one) into the training model "
        "--model builds, fuse it, pair its layers with the deploy model --into builds by "
        "structure (execution order, shapes; never names), check that the deploy model "
        "computes what the training model does, and save the deploy model's state_dict.",
    )
    convert.add_argument("checkpoint", type=Path, help="the training checkpoint (torch.save)")
    convert.add_argument(
        "--model",
        required=True,
        metavar="SPEC",
        help="the training-time model, e.g. repvgg.py:create_RepVGG_A0",
    )
    convert.add_argument(
        "--into",
        required=True,
        metavar="SPEC",
        help="the deploy-time model, e.g. 'repvgg.py:create_RepVGG_A0(deploy=True)'",
    )
    convert.add_argument(
        "-o",
        "--output",
        type=Path,
        default=None,
        metavar="PATH",
        help="where to write the deploy state_dict (default: CHECKPOINT's name + _deploy.pt)",
    )
    convert.add_argument(
        "--key", default=None, help="the checkpoint's entry that holds the state_dict"
    )
    convert.add_argument(
        "--input-shape",
        type=_shape,
        default=None,
        metavar="N,C,H,W",
        help="input shape for the checks (default: the model's example_input_shape, else "
        "1,3,224,224)",
    )
    _verify_arg(convert, default=2)
    _common_args(convert)
    convert.set_defaults(run=run_convert, randomize_bn=False)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fxfuse",
        description="Fuse training-time networks (RepVGG, ACNet, MobileOne, conv+BN, …) into "
        "inference-time ones.",
        epilog="Models: builtin:training_time_net, torchvision:resnet50, timm:repvgg_a0, "
        "path/to/file.py:factory. Library models get random weights; nothing is downloaded. "
        "`fxfuse COMMAND --help` describes a command.",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"fxfuse {fxfuse.__version__} (torch {torch.__version__})",
    )
    _debug_arg(parser, default=False)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    _optimize_parser(commands)
    _inspect_parser(commands)
    _bench_parser(commands)
    _convert_parser(commands)
    return parser


def _hint(error: BaseException) -> str:
    hint = getattr(error, "cli_hint", "") or getattr(error, "hint", "")
    return hint or "run again with --debug to see the traceback"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 a mismatch, 2 an error).

    Without a command it prints the help and returns 0.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING, format="%(name)s: %(message)s"
    )
    if not args.debug:
        # torch logs its own view of a failed capture (graph dumps, guard warnings) when the
        # torch.export fallback gives up; fxfuse's error says what matters, in one place
        logging.getLogger("torch").setLevel(logging.ERROR)
    try:
        return int(args.run(args))
    except KeyboardInterrupt:
        print("fxfuse: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if args.debug:
            raise
        known = isinstance(error, (FxFuseError, SpecError))
        text = str(getattr(error, "message", "") or error).strip() or type(error).__name__
        first, *rest = text.splitlines()
        if not known:
            first = f"{type(error).__name__}: {first}"
            rest = []
        print(f"fxfuse: error: {first}", file=sys.stderr)
        for line in rest:
            print(line, file=sys.stderr)
        print(f"hint: {_hint(error)}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
