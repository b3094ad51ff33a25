"""The ``fxfuse`` command line: fuse a model without writing code.

``fxfuse optimize`` with no model fuses the built-in training-time network
(:func:`fxfuse.zoo.training_time_net`), checks it against the original and prints what
changed. Errors are one line and a hint; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

import fxfuse
from fxfuse import zoo
from fxfuse.errors import FxFuseError
from fxfuse.testing import count_ops, randomize_batch_norms, relative_error

__all__ = ["main"]

DEFAULT_SPEC = "builtin:training_time_net"
BUILTINS: dict[str, Callable[[], nn.Module]] = {
    "training_time_net": zoo.training_time_net,
    "repvgg_net": zoo.repvgg_net,
}


class UsageError(Exception):
    """A mistake on the command line: printed as one line, no traceback."""


def load_model(spec: str) -> nn.Module:
    """The model a SPEC names (``builtin:NAME``)."""
    kind, _, name = spec.partition(":")
    if kind == "builtin":
        if name not in BUILTINS:
            raise UsageError(f"no built-in model {name!r}; choose from {', '.join(BUILTINS)}")
        return BUILTINS[name]()
    raise UsageError(f"cannot read model spec {spec!r}; use builtin:NAME")


def _shape(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from error


def _median_ms(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e3


def _table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for n, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)
        ]
        lines.append("  ".join(cells))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run_optimize(args: argparse.Namespace) -> int:
    torch.manual_seed(args.seed)
    model = load_model(args.spec)
    randomize_batch_norms(model, args.seed)
    model.eval()
    inputs = [torch.randn(*args.input_shape) for _ in range(max(args.verify, 1))]
    fused = fxfuse.optimize(model)
    print(fused.fxfuse_report)
    with torch.no_grad():
        worst = max(relative_error(model(x), fused(x)) for x in inputs)
        before, after = count_ops(model, inputs[0]), count_ops(fused, inputs[0])
        eager = _median_ms(lambda: model(inputs[0]), args.repeats)
        fast = _median_ms(lambda: fused(inputs[0]), args.repeats)
    print()
    print(
        _table(
            [
                ("executed on input " + "x".join(map(str, args.input_shape)), "original", "fused"),
                ("convolutions", str(before["conv"]), str(after["conv"])),
                ("batch norms", str(before["batch_norm"]), str(after["batch_norm"])),
                (
                    "aten ops",
                    str(sum(v for k, v in before.items() if k not in ("conv", "batch_norm"))),
                    str(sum(v for k, v in after.items() if k not in ("conv", "batch_norm"))),
                ),
                (f"latency, median of {args.repeats} (ms)", f"{eager:.2f}", f"{fast:.2f}"),
            ]
        )
    )
    tolerance = 1e-5
    verdict = "ok" if worst <= tolerance else "MISMATCH"
    print(
        f"\nworst normalised error over {len(inputs)} inputs: {worst:.2e} "
        f"(tolerance {tolerance:g}): {verdict}"
    )
    return 0 if worst <= tolerance else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fxfuse", description="Fuse training-time networks into inference-time ones."
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    commands = parser.add_subparsers(dest="command", required=True)
    opt = commands.add_parser("optimize", help="fuse a model, check it, print what changed")
    opt.add_argument(
        "spec", nargs="?", default=DEFAULT_SPEC, help=f"the model (default {DEFAULT_SPEC})"
    )
    opt.add_argument(
        "--input-shape",
        type=_shape,
        default=(1, 3, 64, 64),
        help="comma-separated input shape (default 1,3,64,64)",
    )
    opt.add_argument(
        "--verify",
        type=int,
        default=4,
        metavar="N",
        help="compare outputs on N random inputs (default 4)",
    )
    opt.add_argument("--repeats", type=int, default=10, help="timing repeats (default 10)")
    opt.add_argument("--seed", type=int, default=0)
    opt.set_defaults(run=run_optimize)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING, format="%(name)s: %(message)s"
    )
    try:
        return int(args.run(args))
    except (UsageError, FxFuseError) as error:
        if args.debug:
            raise
        first, *rest = str(error).splitlines() or [type(error).__name__]
        print(f"fxfuse: error: {first}", file=sys.stderr)
        for line in rest:
            print(line, file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
