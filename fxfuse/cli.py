"""The ``fxfuse`` command line: fuse a model without writing code.

::

    fxfuse optimize [SPEC] [--input-shape 1,3,224,224] [--verify N] [--save out.pt2|out.onnx]
    fxfuse inspect SPEC     # the re-parameterizable structures found; nothing is changed
    fxfuse bench SPEC       # latency side by side: eager, fxfuse, timm, fx, jit, Inductor

SPEC is ``builtin:NAME``, ``torchvision:NAME``, ``timm:NAME``, ``path/to/file.py:factory`` or
``package.module:factory`` (:mod:`fxfuse.models`). ``fxfuse optimize`` with no SPEC fuses the
built-in training-time network (:func:`fxfuse.zoo.training_time_net`), checks it against the
original and prints what changed: the README's main job. Errors are one line and a hint;
``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import sys
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


def _load(args: argparse.Namespace) -> tuple[LoadedModel, tuple[int, ...]]:
    """The model the spec names, its batch norms randomized where its weights are random."""
    torch.manual_seed(args.seed)
    loaded = load_model(args.spec)
    if loaded.random_weights or args.randomize_bn:
        randomize_batch_norms(loaded.model, args.seed)
    shape = args.input_shape or loaded.input_shape
    return loaded, shape


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
            "give the right one with --input-shape, e.g. --input-shape 1,3,224,224",
        ) from error


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


def _fuse(model: nn.Module, x: Tensor | None, debug: bool) -> GraphModule:
    """``fxfuse.optimize``, with what torch prints to stderr held back until it succeeds.

    When symbolic tracing fails and the ``torch.export`` fallback fails too, torch prints the
    partial graph it had before raising; fxfuse's error already says where and what to try,
    so that dump is shown with ``--debug`` only.
    """
    example = None if x is None else (x,)
    if debug:
        return fxfuse.optimize(model, example_inputs=example)
    held = io.StringIO()
    with contextlib.redirect_stderr(held):
        fused = fxfuse.optimize(model, example_inputs=example)
    sys.stderr.write(held.getvalue())  # warnings of a run that worked still reach the user
    return fused


# -- fxfuse optimize ---------------------------------------------------------------------------


def run_optimize(args: argparse.Namespace) -> int:
    if args.save is not None and args.save.suffix.lower() not in _SAVERS:
        raise UsageError(f"cannot save as {args.save.name!r}", "use a .pt2 or .onnx file name")
    loaded, shape = _load(args)
    model = loaded.model
    inputs = _inputs(shape, max(args.verify, 1), args.seed)
    randomized = loaded.random_weights or args.randomize_bn
    print(f"fxfuse optimize {_describe(loaded, shape, randomized)}")
    _first_input_error(model, inputs[0])
    fused = _fuse(model, inputs[0], args.debug)
    print(fused.fxfuse_report)

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
        _save(fused, inputs[0], args.save)
        print(f"saved the fused model to {args.save}")
    return 0 if worst <= tolerance else 1


def _save_pt2(fused: GraphModule, x: Tensor, path: Path) -> None:
    torch.export.save(torch.export.export(fused, (x,)), str(path))


def _save_onnx(fused: GraphModule, x: Tensor, path: Path) -> None:
    try:
        import onnxscript  # noqa: F401  (the exporter needs it)
    except ImportError as error:
        raise UsageError(
            "saving as ONNX needs onnx and onnxscript", "pip install onnx onnxscript"
        ) from error
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(fused, (x,), dynamo=True, verbose=False)
    assert program is not None
    program.save(str(path))


_SAVERS: dict[str, Callable[[GraphModule, Tensor, Path], None]] = {
    ".pt2": _save_pt2,  # torch.export archive: loads without the model's source code
    ".onnx": _save_onnx,
}


def _save(fused: GraphModule, x: Tensor, path: Path) -> None:
    """Write ``fused`` as a ``torch.export`` archive (.pt2) or an ONNX model (.onnx)."""
    _SAVERS[path.suffix.lower()](fused, x, path)


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


def run_bench(args: argparse.Namespace) -> int:
    from fxfuse.bench import VARIANTS, compare

    variants = args.variants.split(",") if args.variants else list(VARIANTS)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise UsageError(
            f"unknown variant {', '.join(unknown)}", f"choose from {','.join(VARIANTS)}"
        )
    loaded, shape = _load(args)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = loaded.model.to(device)
    x = _inputs(shape, 1, args.seed)[0].to(device)
    print(f"fxfuse bench {_describe(loaded, shape, True)}", flush=True)
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
        phases = ", ".join(f"{k} {format_seconds(v)}" for k, v in fx.phases.items())
        print(f"fxfuse conversion: {format_seconds(fx.convert_s)} ({phases})")
    for baseline in ("timm", "inductor", "jit.freeze"):
        ratio = result.latency_ratio("fxfuse", baseline)
        if ratio is not None:
            print(f"fxfuse latency / {baseline}: {ratio:.2f}")
    if args.json is not None:
        args.json.write_text(json.dumps(result.to_dict(), indent=2, default=str))
        print(f"wrote {args.json}")
    return 0


# -- the parser --------------------------------------------------------------------------------


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
    parser.add_argument("--seed", type=int, default=0, help="seed for inputs and statistics")
    parser.add_argument(
        "--randomize-bn",
        action="store_true",
        help="randomize batch-norm statistics of a model from a file too (library models "
        "always are: their weights are random anyway)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fxfuse",
        description="Fuse training-time networks (RepVGG, ACNet, MobileOne, conv+BN, …) into "
        "inference-time ones.",
        epilog="Models: builtin:training_time_net, torchvision:resnet50, timm:repvgg_a0, "
        "path/to/file.py:factory. Library models get random weights; nothing is downloaded.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    opt = commands.add_parser("optimize", help="fuse a model, verify it, print what changed")
    _model_args(opt, default_spec=DEFAULT_SPEC)
    opt.add_argument(
        "--verify",
        type=int,
        default=4,
        metavar="N",
        help="compare outputs on N random inputs (default 4)",
    )
    opt.add_argument(
        "--save",
        type=Path,
        default=None,
        metavar="PATH",
        help="write the fused model: .pt2 or .onnx",
    )
    opt.add_argument("--repeats", type=int, default=10, help="latency repeats (default 10)")
    opt.set_defaults(run=run_optimize)

    ins = commands.add_parser("inspect", help="show the re-parameterizable structures found")
    _model_args(ins, default_spec=None)
    ins.add_argument("--max-declines", type=int, default=20, help="list at most this many declines")
    ins.set_defaults(run=run_inspect)

    bench = commands.add_parser("bench", help="latency side by side: eager, fxfuse, timm, …")
    _model_args(bench, default_spec=None)
    bench.add_argument(
        "--variants",
        default=None,
        help="comma-separated subset of eager,fxfuse,timm,fx.fuse,jit.freeze,inductor,"
        "fxfuse+inductor (default all)",
    )
    bench.add_argument("--rounds", type=int, default=20, help="interleaved timing rounds")
    bench.add_argument("--warmup", type=int, default=3, help="untimed calls per variant first")
    bench.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    bench.add_argument("--json", type=Path, default=None, metavar="PATH", help="write the results")
    bench.set_defaults(run=run_bench)
    return parser


def _hint(error: BaseException) -> str:
    hint = getattr(error, "cli_hint", "") or getattr(error, "hint", "")
    return hint or "run again with --debug to see the traceback"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 a mismatch, 2 an error)."""
    args = build_parser().parse_args(argv)
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
