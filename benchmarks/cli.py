"""``python -m benchmarks [all|latency|scaling|memory|plot] [--quick] …``

``all`` (the default) runs latency, scaling and memory and draws the plot; ``profile``
prints where ``optimize`` spends its time (cProfile, per phase); ``equivalence`` prints the
README's model table (ops executed, errors, parameters; fxfuse beside timm's converter).
``live`` times the compile backend's live weights against fused ones (per-call cost).
``convert`` times ``optimize`` (per phase) against timm's converter on the timm
re-parameterizable families, and the converted models' per-call cost at batch 1.
``rdrop`` times one R-Drop training step with ``fxfuse.rdrop``'s twin against two forward
passes, and their peak memory. ``training`` times one training step of a CSLA network as
written, online-merged (``fxfuse.online_merge``) and plain (``fxfuse.gradient_reparam``),
and their peak memory. ``quant`` measures INT8 after fusion: output SQNR of repvgg_a0 and
mobileone_s0 (trained-like batch norms) with and without equalization, weights alone and
through torchao's PT2E flow, per tensor and per channel. ``--quick`` is the short run (a few
minutes on 2 cores): four models, 10 rounds, 10/100/1,000 blocks. The 10,000-block point is
its own command::

    python -m benchmarks scaling --blocks 10 100 1000 10000

Each command writes its section of ``benchmarks/out/results.json`` and redraws
``benchmarks/out/benchmarks.png`` from whatever the file holds.
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from benchmarks import (
    convert,
    equivalence,
    latency,
    live_weights,
    markdown,
    memory,
    plots,
    profile,
    quant,
    rdrop,
    scaling,
    training,
)
from benchmarks.common import OUT, cold_compiles, load_results, machine, save_section
from fxfuse.bench import VARIANTS


def _device(name: str | None) -> str:
    return name or ("cuda" if torch.cuda.is_available() else "cpu")


def run_latency(args: argparse.Namespace) -> None:
    specs = args.models or (latency.QUICK_MODELS if args.quick else latency.FULL_MODELS)
    rounds = args.rounds or (10 if args.quick else 30)
    device = _device(args.device)
    env = machine(device)
    env["inductor_cache"] = cold_compiles()
    models = latency.run(
        specs,
        input_size=args.input_size,
        rounds=rounds,
        variants=args.variants,
        device=device,
        convert_repeats=args.convert_repeats,
    )
    print(latency.overview(models))
    env["load_average_after"] = machine(device)["load_average"]
    save_section(args.json, "latency", {"machine": env, "rounds": rounds, "models": models})


def run_scaling(args: argparse.Namespace) -> None:
    sizes = args.blocks or ([10, 100, 1000] if args.quick else [10, 100, 1000, 10000])
    env = machine("cpu")
    result = scaling.run(sizes, repeats=args.repeats)
    env["load_average_after"] = machine("cpu")["load_average"]
    save_section(args.json, "scaling", {"machine": env, **result})


def run_memory(args: argparse.Namespace) -> None:
    specs = args.models or (latency.QUICK_MODELS if args.quick else latency.FULL_MODELS)
    specs = [*specs, "synthetic:1000"]
    save_section(args.json, "memory", {"machine": machine("cpu"), "models": memory.run(specs)})


def run_profile(args: argparse.Namespace) -> None:
    for blocks in args.blocks or [1000]:
        save_section(args.json, f"profile_{blocks}", profile.run(blocks))


def run_convert(args: argparse.Namespace) -> None:
    env = machine("cpu")
    result = convert.run(args.models or convert.MODELS, rounds=args.rounds or 5)
    env["load_average_after"] = machine("cpu")["load_average"]
    save_section(args.json, "convert", {"machine": env, "models": result})


def run_live(args: argparse.Namespace) -> None:
    env = machine("cpu")
    result = live_weights.run(args.models or live_weights.MODELS, rounds=args.rounds or 20)
    env["load_average_after"] = machine("cpu")["load_average"]
    save_section(args.json, "live_weights", {"machine": env, "models": result})


def run_rdrop(args: argparse.Namespace) -> None:
    device = _device(args.device)
    env = machine(device)
    models = rdrop.run(
        args.models or rdrop.QUICK,
        batch=args.batch or (16 if args.quick else 64),
        rounds=args.rounds or (10 if args.quick else 30),
        device=device,
    )
    env["load_average_after"] = machine(device)["load_average"]
    save_section(args.json, "rdrop", {"machine": env, "models": models})


def run_training(args: argparse.Namespace) -> None:
    device = _device(args.device)
    env = machine(device)
    models = training.run(
        args.models or training.QUICK,
        batch=args.batch or 32,
        rounds=args.rounds or (10 if args.quick else 30),
        device=device,
    )
    env["load_average_after"] = machine(device)["load_average"]
    save_section(args.json, "training", {"machine": env, "models": models})


def run_quant(args: argparse.Namespace) -> None:
    env = machine("cpu")
    rows = quant.run(
        args.models or quant.MODELS,
        seeds=1 if args.quick else 3,
        size=args.input_size or 128,
        batch=args.batch or 8,
    )
    env["load_average_after"] = machine("cpu")["load_average"]
    save_section(args.json, "quant", {"machine": env, "models": rows})


def run_markdown(args: argparse.Namespace) -> None:
    print(markdown.render(load_results(args.json)))


def run_plot(args: argparse.Namespace) -> None:
    path = plots.plot(load_results(args.json), args.png)
    print(f"wrote {path}" if path else "nothing to plot (or matplotlib is not installed)")


def run_all(args: argparse.Namespace) -> None:
    for step in (run_latency, run_scaling, run_memory):
        step(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "command",
        nargs="?",
        default="all",
        choices=[
            "all",
            "latency",
            "scaling",
            "memory",
            "profile",
            "plot",
            "markdown",
            "equivalence",
            "live",
            "rdrop",
            "convert",
            "training",
            "quant",
        ],
    )
    parser.add_argument("--quick", action="store_true", help="the short run (minutes)")
    parser.add_argument("--models", nargs="+", metavar="SPEC", help="model specs to measure")
    parser.add_argument(
        "--variants",
        type=lambda s: s.split(","),
        default=None,
        help=f"comma-separated subset of {','.join(VARIANTS)}",
    )
    parser.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds")
    parser.add_argument(
        "--convert-repeats",
        type=int,
        default=5,
        help="conversions of fxfuse, timm and fx.fuse for the median (compilers: once)",
    )
    parser.add_argument("--input-size", type=int, default=None, help="override H = W")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (default: torch's)"
    )
    parser.add_argument("--blocks", type=int, nargs="+", help="synthetic network sizes")
    parser.add_argument(
        "--batch", type=int, default=None, help="rdrop, training, quant: the batch size"
    )
    parser.add_argument("--repeats", type=int, default=3, help="optimize runs per size")
    parser.add_argument("--json", type=Path, default=OUT / "results.json")
    parser.add_argument("--png", type=Path, default=OUT / "benchmarks.png")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch.jit's deprecation
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    steps = {
        "all": run_all,
        "latency": run_latency,
        "scaling": run_scaling,
        "memory": run_memory,
        "profile": run_profile,
        "convert": run_convert,
        "live": run_live,
        "rdrop": run_rdrop,
        "training": run_training,
        "quant": run_quant,
        "markdown": lambda a: None,
        "plot": lambda a: None,
    }
    if args.command == "markdown":
        run_markdown(args)
        return 0
    if args.command == "equivalence":  # the README's model table, as markdown
        equivalence.main()
        return 0
    steps[args.command](args)
    run_plot(args)
    print(f"results in {args.json} ({time.perf_counter() - start:.0f} s)")
    return 0
