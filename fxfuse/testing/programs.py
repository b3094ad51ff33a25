"""Hypothesis strategies for programs with effects around re-parameterizable blocks.

:mod:`fxfuse.testing.strategies` draws the algebra (branches, kernels, paddings); this module
draws what surrounds it in real code and what a rewrite must not move, drop or freeze:

- **blocks** fxfuse fuses: conv + batch norm, RepVGG blocks, inline sums of branches (3×3,
  1×1, conv-bn, batch norm alone, identity) with constant or buffer scales;
- **in-place ops** on views and on arguments: ``y.narrow(1, 0, k).add_(…)``, ``acc += …``,
  ``out=``, ``relu_`` in four spellings (``nn.ReLU(inplace=True)`` among them), ``mul_``,
  ``x[:, :k] = …`` on a fresh tensor or on an input;
- **buffers updated through aliases** inside forward: ``self.s0.view(-1).mul_(…)``,
  ``self.s0.data.mul_(…)``, ``self.s0.t().add_(…)``, running-statistics-style updates;
- **hooks**: forward hooks and pre-hooks on the root, on a container tracing goes through
  and on a leaf conv, that change what flows or record it into a dict;
- **random ops** on activations (dropout in training mode, ``torch.rand_like``,
  ``torch.bernoulli``) and on weights (``F.gumbel_softmax``, ``torch.binomial``, a Bernoulli
  mask, dropout of a per-channel scale);
- **leaf modules** that change their input in place (:class:`InplaceSwish`,
  :class:`InplaceShift`; pass :attr:`Program.leaf_modules` to ``fxfuse.optimize``).

A program is a list of :class:`Step` s over a pool of values (the inputs, then what each
step computes; every value is ``N × C × H × W``), rendered to Python source for ``forward``
and compiled with ``exec``, so ``torch.fx`` traces it as it traces user code and a
counterexample reads as code (:attr:`Program.source`). Steps name their operands by index
modulo the pool, so every drawn list is a valid program and hypothesis shrinks it freely:
dropping steps, and each choice towards the simplest spelling.

    from hypothesis import given
    from fxfuse.testing.programs import Program, programs

    @given(programs())
    def test_mine(program: Program) -> None:
        print(program.source)
        reference, store = program.build()
        ...

Built programs are float64, eval mode, with random weights and batch-norm statistics; two
builds of one spec are identical and independent (each has its own hook store).
"""

from __future__ import annotations

import functools
import linecache
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import Tensor, nn

from fxfuse.testing import randomize_batch_norms
from fxfuse.zoo import RepVGGBlock

__all__ = [
    "EFFECTS",
    "HookSpec",
    "InplaceShift",
    "InplaceSwish",
    "Program",
    "ProgramSpec",
    "Step",
    "build_program",
    "program_specs",
    "programs",
    "recorder",
    "render",
]


class InplaceSwish(nn.Module):
    """``x · sigmoid(x)``, computed into ``x`` (memory-saving activations do this)."""

    def forward(self, x: Tensor) -> Tensor:
        return x.mul_(torch.sigmoid(x))


class InplaceShift(nn.Module):
    """Adds 0.5 to its input in place and returns twice the result (a new tensor)."""

    def forward(self, x: Tensor) -> Tensor:
        x.add_(0.5)
        return x * 2


# --------------------------------------------------------------------------------------------
# Specs
# --------------------------------------------------------------------------------------------

#: The effect families and their step kinds, for drawing programs that stress some of them
#: (``effects=``). Besides these, steps are blocks (``conv-bn``, ``repvgg``, ``branches``)
#: and plain ops (``act``, ``add``).
EFFECTS = {
    "in-place": ("narrow-add", "iadd", "relu_", "mul_", "mutate-between"),
    "setitem": ("setitem",),
    "buffers": ("buffer", "buffer-scaled"),
    "random": ("random-act", "random-weight"),
    "leaf": ("leaf", "leaf-between"),
    "hooks": (),
}

_BLOCKS = ("conv-bn", "repvgg", "branches")


@dataclass(frozen=True)
class Step:
    """One statement of ``forward``: ``kind`` (a block, ``act``, ``add`` or a kind of
    :data:`EFFECTS`) reads value ``source`` and, for in-place kinds, writes value ``target``
    (indices into the values defined so far, modulo their number; a ``buffer`` step's
    ``target`` picks the buffer). ``variant`` picks spellings and sub-kinds digit by digit
    (0 is the plainest)."""

    kind: str
    source: int = 0
    target: int = 0
    variant: int = 0


@dataclass(frozen=True)
class HookSpec:
    """A hook on the ``root``, on the first ``container`` a step created (a conv-bn
    ``Sequential`` or a RepVGG block: tracing goes through both), or on the first ``leaf``
    conv. ``kind``: ``"forward"`` or ``"pre"``; ``action``: ``"scale"`` (changes what flows),
    ``"record"`` (appends to a dict; a closure) or ``"record-partial"`` (the same through
    ``functools.partial``)."""

    where: str
    kind: str
    action: str


@dataclass(frozen=True)
class ProgramSpec:
    """A drawn program: ``channels`` C, whether ``forward`` takes an ``acc`` argument besides
    ``x``, how many ``(C, 1)`` scale ``buffers`` it owns, its steps, hooks, an optional extra
    output (an index into the values) and the weights' seed."""

    channels: int
    takes_acc: bool
    buffers: int
    steps: tuple[Step, ...]
    hooks: tuple[HookSpec, ...] = ()
    extra_output: int | None = None
    seed: int = 0


def _digits(variant: int, *bases: int) -> list[int]:
    out = []
    for base in bases:
        out.append(variant % base)
        variant //= base
    return out


@st.composite
def program_specs(
    draw: st.DrawFn,
    *,
    max_steps: int = 6,
    effects: tuple[str, ...] = tuple(EFFECTS),
    required: tuple[str, ...] = (),
    channels: tuple[int, ...] = (2, 3, 4),
) -> ProgramSpec:
    """Draw a :class:`ProgramSpec` of at most ``max_steps`` steps (plus ``required``).

    ``effects`` (keys of :data:`EFFECTS`) choose which kinds of effect the steps and hooks
    may use; blocks and plain ops are always drawn, and every program has a block, so there
    is something to fuse. ``required`` step kinds appear at least once each (placed
    anywhere), e.g. ``("setitem",)`` for programs symbolic tracing cannot capture.
    """
    unknown = set(effects) - set(EFFECTS)
    if unknown:
        raise ValueError(f"effects must be some of {sorted(EFFECTS)}, got {sorted(unknown)}")
    effect_kinds = [kind for name in effects for kind in EFFECTS[name]]
    # (most effect steps compute a sum of branches too: there is plenty to fuse)
    kinds = [*_BLOCKS, "act", "add", *effect_kinds]
    index, variant = st.integers(0, 7), st.integers(0, 2**12)
    step = st.builds(Step, st.sampled_from(kinds), index, index, variant)
    first = st.builds(Step, st.sampled_from(_BLOCKS), st.just(0), st.just(0), variant)
    steps = [draw(first), *draw(st.lists(step, max_size=max_steps - 1))]
    steps += [draw(st.builds(Step, st.just(kind), index, index, variant)) for kind in required]
    order = draw(st.permutations(range(len(steps))))
    hooks: tuple[HookSpec, ...] = ()
    if "hooks" in effects:
        hooks = tuple(
            draw(
                st.lists(
                    st.builds(
                        HookSpec,
                        st.sampled_from(["root", "container", "leaf"]),
                        st.sampled_from(["forward", "pre"]),
                        st.sampled_from(["scale", "record", "record-partial"]),
                    ),
                    max_size=2,
                )
            )
        )
    return ProgramSpec(
        channels=draw(st.sampled_from(channels)),
        takes_acc=draw(st.booleans()) if "in-place" in effects else False,
        buffers=draw(st.integers(1, 2)) if "buffers" in effects else 0,
        steps=tuple(steps[i] for i in order),
        hooks=hooks,
        extra_output=draw(st.none() | st.integers(0, 7)),
        seed=draw(st.integers(0, 2**16)),
    )


# --------------------------------------------------------------------------------------------
# Rendering a spec to source and modules
# --------------------------------------------------------------------------------------------


class _Renderer:
    """Turns steps into lines of ``forward`` and the modules, buffers and parameters they use."""

    def __init__(self, spec: ProgramSpec):
        self.spec = spec
        self.c = spec.channels
        self.values = ["x", "acc"] if spec.takes_acc else ["x"]
        self.lines: list[str] = []
        self.modules: dict[str, Callable[[], nn.Module]] = {}
        self.containers: list[str] = []  # conv-bn Sequentials and RepVGG blocks
        self.convs: list[str] = []  # every nn.Conv2d, in the order the module registers them
        self.tensors: dict[str, tuple[str, Callable[[], Tensor]]] = {}
        self.training: set[str] = set()

    # -- helpers ------------------------------------------------------------------------------

    def module(self, name: str, factory: Callable[[], nn.Module], first_conv: str = "") -> str:
        """Register a submodule; ``first_conv`` is the path of a container's first conv."""
        self.modules[name] = factory
        if first_conv:
            self.containers.append(name)
            self.convs.append(f"{name}.{first_conv}")
        return f"self.{name}"

    def conv(self, name: str, cout: int, kernel: int, bias: bool = False) -> str:
        c = self.c
        self.convs.append(name)
        return self.module(name, lambda: nn.Conv2d(c, cout, kernel, padding=kernel // 2, bias=bias))

    def buffer(self, index: int) -> str | None:
        if not self.spec.buffers:
            return None
        return f"self.s{index % self.spec.buffers}"

    def value(self, index: int) -> str:
        return self.values[index % len(self.values)]

    def new_value(self, expression: str) -> None:
        name = f"v{len(self.values)}"
        self.lines.append(f"{name} = {expression}")
        self.values.append(name)

    def branch_sum(self, prefix: str, source: str, cout: int, variant: int) -> str:
        """A sum of 1…3 branches on ``source`` with ``cout`` channels: 3×3 and 1×1 convs
        (with or without a batch norm), a batch norm alone and the identity (where ``cout``
        is C), each maybe scaled by a constant or a buffer."""
        count, *choices = _digits(variant, 3, 6, 4, 6, 4, 6, 4)
        terms = []
        kinds = ["conv3-bn", "conv1", "conv3", "conv1-bn", "identity", "bn"]
        if cout != self.c:
            kinds = kinds[:4]
        for j in range(count + 1):
            kind = kinds[choices[2 * j] % len(kinds)]
            scale = choices[2 * j + 1]
            name = f"{prefix}_{j}"
            if kind == "identity":
                term = source
            elif kind == "bn":
                bn = self.module(name, lambda: nn.BatchNorm2d(self.c))
                term = f"{bn}({source})"
            else:
                kernel = 3 if kind.startswith("conv3") else 1
                term = f"{self.conv(name, cout, kernel, bias=j == 1)}({source})"
                if kind.endswith("-bn"):
                    bn = self.module(f"{name}_bn", lambda: nn.BatchNorm2d(cout))
                    term = f"{bn}({term})"
            if scale == 1:
                term = f"{term} * 0.5"
            elif scale == 2:
                term = f"{term} * -1.0"
            elif scale == 3:
                buffer = self.buffer(j)
                if buffer is not None and cout == self.c:
                    term = f"{term} * {buffer}.unsqueeze(-1)"
            terms.append(term)
        return " + ".join(terms)

    # -- steps --------------------------------------------------------------------------------

    def render(self, i: int, step: Step) -> None:
        method = {"relu_": self._relu_inplace, "mul_": self._mul_inplace}.get(step.kind)
        if method is None:
            method = getattr(self, "_" + step.kind.replace("-", "_"))
        method(i, step)

    def _conv_bn(self, i: int, step: Step) -> None:
        kernel = (1, 3)[step.variant % 2]
        c = self.c
        m = self.module(
            f"m{i}",
            lambda: nn.Sequential(
                nn.Conv2d(c, c, kernel, padding=kernel // 2, bias=False), nn.BatchNorm2d(c)
            ),
            first_conv="0",
        )
        self.new_value(f"{m}({self.value(step.source)})")

    def _repvgg(self, i: int, step: Step) -> None:
        c = self.c
        m = self.module(f"m{i}", lambda: RepVGGBlock(c, c), first_conv="dense.0")
        self.new_value(f"{m}({self.value(step.source)})")

    def _branches(self, i: int, step: Step) -> None:
        self.new_value(self.branch_sum(f"b{i}", self.value(step.source), self.c, step.variant))

    def _act(self, i: int, step: Step) -> None:
        s = self.value(step.source)
        self.new_value((f"F.relu({s})", f"torch.sigmoid({s})", f"{s} * 2")[step.variant % 3])

    def _add(self, i: int, step: Step) -> None:
        self.new_value(f"{self.value(step.source)} + {self.value(step.target)}")

    def _leaf(self, i: int, step: Step) -> None:
        leaf = (InplaceSwish, InplaceShift)[step.variant % 2]
        m = self.module(f"leaf{i}", leaf)
        self.new_value(f"{m}({self.value(step.source)})")

    def _random_act(self, i: int, step: Step) -> None:
        s = self.value(step.source)
        which = step.variant % 4
        if which == 3:
            m = self.module(f"drop{i}", lambda: nn.Dropout(0.25))
            self.training.add(f"drop{i}")
            self.new_value(f"{m}({s})")
            return
        self.new_value(
            (
                f"F.dropout({s}, 0.25, training=True)",
                f"{s} + 0.1 * torch.rand_like({s})",
                f"{s} * torch.bernoulli(torch.full_like({s}, 0.75))",
            )[which]
        )

    def _random_weight(self, i: int, step: Step) -> None:
        s = self.value(step.source)
        which, kernel = _digits(step.variant, 5, 2)
        c = self.c
        a = self.conv(f"r{i}_a", c, 3)
        b = self.conv(f"r{i}_b", c, 1 + 2 * kernel)
        if which == 0:  # GDAS: a random choice of branch
            self.tensors[f"alpha{i}"] = ("parameter", lambda: torch.randn(2))
            self.lines.append(f"w{i} = F.gumbel_softmax(self.alpha{i}, tau=1.0)")
            self.new_value(f"w{i}[0] * {a}({s}) + w{i}[1] * {b}({s})")
            return
        self.tensors[f"g{i}"] = ("buffer", lambda: torch.rand(c, 1, 1) * 0.6 + 0.2)
        scale = (
            "",
            f"torch.bernoulli(self.g{i})",
            f"F.dropout(self.g{i}, 0.25, training=True)",
            f"torch.binomial(torch.full_like(self.g{i}, 50.0), self.g{i}) / 50.0",
            f"torch._standard_gamma(self.g{i} * 10.0)",
        )[which]
        self.new_value(f"{a}({s}) * {scale} + {b}({s})")

    def _narrow_add(self, i: int, step: Step) -> None:
        width, spelling = _digits(step.variant, self.c, 2)
        k = width + 1
        t, s = self.value(step.target), self.value(step.source)
        update = self.branch_sum(f"n{i}", s, k, step.variant // (2 * self.c))
        if spelling == 0:
            self.lines.append(f"{t}.narrow(1, 0, {k}).add_({update})")
        else:
            self.lines.append(f"y{i} = {t}.narrow(1, 0, {k})")
            self.lines.append(f"y{i} += {update}")

    def _iadd(self, i: int, step: Step) -> None:
        t, s = self.value(step.target), self.value(step.source)
        spelling = step.variant % 3
        update = self.branch_sum(f"a{i}", s, self.c, step.variant // 3)
        self.lines.append(
            (f"{t} += {update}", f"{t}.add_({update})", f"torch.add({t}, {update}, out={t})")[
                spelling
            ]
        )

    def _relu_inplace(self, i: int, step: Step) -> None:
        t = self.value(step.target)
        spelling = step.variant % 4
        if spelling == 3:
            m = self.module(f"act{i}", lambda: nn.ReLU(inplace=True))
            self.lines.append(f"{m}({t})")
            return
        self.lines.append(
            (f"{t}.relu_()", f"torch.relu_({t})", f"F.relu({t}, inplace=True)")[spelling]
        )

    def _mul_inplace(self, i: int, step: Step) -> None:
        t = self.value(step.target)
        self.lines.append((f"{t}.mul_(0.5)", f"{t}.sub_(0.25)")[step.variant % 2])

    def _setitem(self, i: int, step: Step) -> None:
        width = step.variant % self.c
        k = width + 1
        t, s = self.value(step.target), self.value(step.source)
        update = self.branch_sum(f"i{i}", s, k, step.variant // self.c)
        self.lines.append(f"{t}[:, :{k}] = {update}")

    def _buffer_scaled(self, i: int, step: Step) -> None:
        """Two branches, one scaled by a buffer (which a ``buffer`` step may change)."""
        buffer = self.buffer(step.target)
        s = self.value(step.source)
        a, b = self.conv(f"k{i}_a", self.c, 3), self.conv(f"k{i}_b", self.c, 1)
        scale = f" * {buffer}.unsqueeze(-1)" if buffer is not None else ""
        self.new_value(f"{a}({s}){scale} + {b}({s})")

    def _between(self, i: int, step: Step, effect: str) -> None:
        """``s`` read by a sum, changed in place by ``effect``, read by a second sum, and the
        two summed: a merge of the two would read ``s`` once, after the change."""
        s = self.value(step.source)
        first = self.branch_sum(f"p{i}", s, self.c, step.variant // 8)
        self.lines.append(f"p{i} = {first}")
        self.lines.append(effect)
        second = self.branch_sum(f"q{i}", s, self.c, step.variant // 8 + 1)
        self.new_value(f"p{i} + {second}")

    def _mutate_between(self, i: int, step: Step) -> None:
        s = self.value(step.source)
        effects = (f"{s}.relu_()", f"{s}.mul_(0.5)", f"F.relu({s}, inplace=True)", f"{s}.add_(1.0)")
        self._between(i, step, effects[step.variant % 4])

    def _leaf_between(self, i: int, step: Step) -> None:
        leaf = (InplaceSwish, InplaceShift)[step.variant % 2]
        m = self.module(f"leaf{i}", leaf)
        self._between(i, step, f"{m}({self.value(step.source)})")

    def _buffer(self, i: int, step: Step) -> None:
        buffer = self.buffer(step.target)
        if buffer is None:
            return
        s = self.value(step.source)
        running = f"0.1 * {s}.mean((0, 2, 3)).unsqueeze(-1)"
        self.lines.append(
            (
                f"{buffer}.view(-1).mul_(0.9)",
                f"{buffer}.data.mul_(0.9)",
                f"{buffer}.t().add_(0.05)",
                f"{buffer}.mul_(0.9)",
                f"{buffer}.mul_(0.9).add_({running})",
                f"{buffer}.data.mul_(0.9).add_({running})",
            )[step.variant % 6]
        )


class ProgramModule(nn.Module):
    """The base class of built programs: ``forward`` is the rendered source."""

    spec: ProgramSpec
    source: str


def _scaled(value: Any, factor: float) -> Any:
    if isinstance(value, tuple):  # (a root returning several outputs)
        return tuple(_scaled(v, factor) for v in value)
    return value * factor  # (a Proxy while torch.fx traces through a container)


def _record(store: dict[str, list[Any]], key: str, module: nn.Module, *args: Any) -> None:
    store.setdefault(key, []).append(args[-1] if len(args) == 2 else args[0][0])


def recorder(
    store: dict[str, list[Any]], key: str, *, partial: bool = False
) -> Callable[..., None]:
    """A hook (forward or pre) that appends what flows (the output; a pre-hook's first
    input) to ``store[key]``: a closure, or a ``functools.partial``, which ``copy.deepcopy``
    copies with its arguments — the store too."""
    if partial:
        return functools.partial(_record, store, key)

    def record(module: nn.Module, *args: Any) -> None:
        _record(store, key, module, *args)

    return record


def _attach(spec: HookSpec, module: nn.Module, key: str, store: dict[str, list[Any]]) -> None:
    record = recorder(store, key, partial=spec.action == "record-partial")

    if spec.kind == "forward":
        if spec.action == "scale":
            module.register_forward_hook(lambda m, args, out: _scaled(out, 2.0))
        else:
            module.register_forward_hook(record)
    elif spec.action == "scale":
        module.register_forward_pre_hook(lambda m, args: (args[0] * 0.5, *args[1:]))
    else:
        module.register_forward_pre_hook(record)


@dataclass
class Program:
    """A spec rendered: the ``source`` of ``forward`` and how to build it (:meth:`build`)."""

    spec: ProgramSpec
    source: str
    leaf_modules: tuple[type[nn.Module], ...] = (InplaceSwish, InplaceShift)

    def build(self) -> tuple[ProgramModule, dict[str, list[Any]]]:
        """A fresh instance (float64, eval mode; its dropout modules in training mode) and
        the dict its recording hooks append to."""
        return build_program(self.spec)

    def inputs(self, batch: int, size: int, seed: int = 0) -> tuple[Tensor, ...]:
        """Inputs ``(x,)`` or ``(x, acc)``: ``batch × C × size × (size + 1)``, float64."""
        generator = torch.Generator().manual_seed(self.spec.seed * 1000 + seed)
        shape = (batch, self.spec.channels, size, size + 1)
        count = 2 if self.spec.takes_acc else 1
        return tuple(
            torch.randn(shape, generator=generator, dtype=torch.float64) for _ in range(count)
        )

    @property
    def hook_sites(self) -> list[str | None]:
        """Where each hook goes: ``""`` for the root, a submodule's qualified name, or
        ``None`` where the program has nothing of the kind (that hook is not attached)."""
        return _hook_sites(_render(self.spec)[1])


def _render(spec: ProgramSpec) -> tuple[str, _Renderer]:
    renderer = _Renderer(spec)
    for i, step in enumerate(spec.steps):
        renderer.render(i, step)
    header = []
    for k, (hook, site) in enumerate(zip(spec.hooks, _hook_sites(renderer), strict=True)):
        if site is None:
            continue
        what = {
            "scale": "multiplies its "
            + ("output by 2" if hook.kind == "forward" else "input by 0.5"),
            "record": f"appends its {'output' if hook.kind == 'forward' else 'input'} to "
            f"store['hook{k}']",
            "record-partial": f"appends to store['hook{k}'] through functools.partial",
        }[hook.action]
        header.append(f"# a {hook.kind} hook on {'self.' + site if site else 'the root'} {what}\n")
    last = renderer.values[-1]
    outputs = [last]
    if spec.extra_output is not None:
        outputs.append(renderer.value(spec.extra_output))
    body = [*renderer.lines, "return " + ", ".join(outputs)]
    args = ", ".join(renderer.values[: 2 if spec.takes_acc else 1])
    source = "".join(header) + f"def forward(self, {args}):\n"
    source += "".join(f"    {line}\n" for line in body)
    return source, renderer


def _hook_sites(renderer: _Renderer) -> list[str | None]:
    found = {"root": [""], "container": renderer.containers, "leaf": renderer.convs}
    return [found[hook.where][0] if found[hook.where] else None for hook in renderer.spec.hooks]


_COUNTER = iter(range(10**9))


def build_program(spec: ProgramSpec) -> tuple[ProgramModule, dict[str, list[Any]]]:
    """Build the module ``spec`` describes (see :class:`Program`), and its hooks' store."""
    source, renderer = _render(spec)
    # a file name linecache knows, so tracebacks and torch.fx's errors show the line
    filename = f"<fxfuse-program-{next(_COUNTER)}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    namespace: dict[str, Any] = {"torch": torch, "F": F}
    exec(compile(source, filename, "exec"), namespace)
    cls = type("DrawnProgram", (ProgramModule,), {"forward": namespace["forward"]})
    torch.manual_seed(spec.seed)
    module = cls()
    module.spec, module.source = spec, source
    for name, factory in renderer.modules.items():
        module.add_module(name, factory())
    for k in range(spec.buffers):
        module.register_buffer(f"s{k}", torch.rand(spec.channels, 1) + 0.5)
    for name, (kind, make) in renderer.tensors.items():
        if kind == "parameter":
            module.register_parameter(name, nn.Parameter(make()))
        else:
            module.register_buffer(name, make())
    randomize_batch_norms(module.to(torch.float64).eval(), spec.seed)
    for name in renderer.training:
        module.get_submodule(name).train()
    store: dict[str, list[Any]] = {}
    for k, (hook, site) in enumerate(zip(spec.hooks, _hook_sites(renderer), strict=True)):
        if site is None:
            continue  # nothing of that kind in this program
        _attach(hook, module.get_submodule(site), f"hook{k}", store)
    return module, store


def render(spec: ProgramSpec) -> Program:
    """The program ``spec`` describes (its source; :meth:`Program.build` makes modules)."""
    return Program(spec, _render(spec)[0])


def programs(**knobs: Any) -> st.SearchStrategy[Program]:
    """Drawn programs (knobs as for :func:`program_specs`)."""
    return program_specs(**knobs).map(render)
