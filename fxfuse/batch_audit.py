"""Does a model keep its samples apart along dim 0? The batch followed through every aten op.

:func:`fxfuse.rdrop` computes a model twice in one pass by writing its batch twice along dim 0.
That is the model's computation, twice, only where dim 0 is the batch everywhere: no op may mix
samples (batch norm excepted — a batch written twice has the mean and variance it had), draw one
random value for several samples, use the batch size as a number, or write batch data into the
model's state. :func:`audit_batch` looks for evidence of each.

It runs the captured graph twice on fake tensors (no data, no arithmetic, nothing of the model
changed), at batch sizes 2 and 3, and records every aten op with its arguments' shapes. Side
by side, a dim whose size is 2 in one run and 3 in the other holds the batch. Each op is then
checked against what it does along its dims:

- an op that works *along* the dim holding the batch mixes samples: a softmax, cumsum, sort or
  flip along it, a convolution or pooling over it, indexing it, a reduction over it;
- a result whose size grows with the batch other than one for one (``torch.cat([x, c])``,
  ``x[:2]``, ``x.repeat(2, 1)``) or in two dims (``x @ x.T``) merges, slices or pairs samples;
- a result without the batch, computed from one with it, reduced over it or picked one sample;
- a random op must draw per sample (dropout's masks): a draw without the batch is shared by
  both copies, and only element-wise samplers are known to draw independently;
- the batch size may size tensors, never enter arithmetic (``x / x.shape[0]``);
- writes into parameters or buffers must not depend on the batch (batch norm's running
  statistics excepted), and the outputs hold the batch at dim 0 or not at all.

A reshape may merge the batch with other dims (``Linear`` on a 3-d input is one matrix product
over ``b·L`` rows): the merged dim is followed through reshapes and through ops that leave it
alone (element-wise ops, matrix rows, normalisation over other dims). Every aten op it does not
know is refused when it reads the batch: the check is conservative, and each refusal names the
op, the line of the model that ran it, and the reason.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.fx import GraphModule, Interpreter, Node
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from fxfuse.batch_ops import (
    CARRY_POSITIONS,
    RANDOM,
    SIZE_ARGUMENTS,
    Batch,
    Call,
    Info,
    Kind,
    Op,
    TensorArg,
    kind_of,
    mixing,
    op_name,
    shape_text,
    tensors_in,
)
from fxfuse.errors import FxFuseError

__all__ = ["Batch", "BatchAudit", "BatchError", "audit_batch"]

log = logging.getLogger("fxfuse")

aten = torch.ops.aten

#: The two batch sizes the graph runs at. Not 1: sizes 1 broadcast, and a training-mode batch
#: norm needs two values per channel.
SIZES = (2, 3)


class BatchError(FxFuseError, ValueError):
    """Doubling the batch along dim 0 would compute something other than the model, twice."""


@dataclass
class BatchAudit:
    """What :func:`audit_batch` found: which outputs hold the batch, what else to know.

    ``outputs``: for each leaf of the output (``torch.utils._pytree`` order), whether it holds
    the batch at dim 0 (``False``: a tensor or value the batch does not change). ``mutated``:
    the input leaves the model writes in place. ``batch_norms_after_random``: the nodes of
    training-mode batch norms that read a value drawn at random (dropout): on a doubled batch
    their statistics cover both copies.
    """

    outputs: tuple[bool, ...]
    mutated: tuple[int, ...] = ()
    batch_norms_after_random: tuple[str, ...] = ()
    ops: int = 0


# --------------------------------------------------------------------------------------------
# Recording: every aten op of one run, its tensors as handles
# --------------------------------------------------------------------------------------------


class _Recorder(TorchDispatchMode):
    """Records each aten op (not ``prim``'s metadata queries) with the fx node that ran it."""

    def __init__(self, inputs: Sequence[Tensor], state: Mapping[int, str]):
        super().__init__()
        self.ids: dict[int, int] = {}
        self.keep: list[Any] = []  # every tensor seen stays alive, so no id is reused
        self.values: dict[int, tuple[Any, ...]] = {}  # small real constants' values
        self.state_names: dict[int, str] = {}
        self.calls: list[Call] = []
        self.node: Node | None = None
        self._state = state
        for t in inputs:
            self._handle(t)

    def _handle(self, t: Tensor) -> int:
        handle = self.ids.get(id(t))
        if handle is None:
            handle = len(self.keep)
            self.ids[id(t)] = handle
            self.keep.append(t)
            if id(t) in self._state:
                self.state_names[handle] = self._state[id(t)]
            elif not isinstance(t, FakeTensor) and t.numel() <= 64:
                self.values[handle] = tuple(t.detach().cpu().reshape(-1).tolist())
        return handle

    def _value(self, v: Any) -> Any:
        if isinstance(v, Tensor):
            return TensorArg(self._handle(v), tuple(v.shape), tuple(v.stride()))
        if isinstance(v, (list, tuple)) and any(isinstance(x, Tensor) for x in v):
            return [self._value(x) for x in v]
        return v

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.namespace == "prim":
            return out
        schema = func._schema
        bound: dict[str, Any] = {}
        written: list[int] = []
        sets: dict[str, list[int]] = {}
        for i, a in enumerate(schema.arguments):
            if i < len(args) and not a.kwarg_only:
                v = args[i]
            elif a.name in kwargs:
                v = kwargs[a.name]
            elif a.has_default_value():
                v = a.default_value
            else:
                v = None
            bound[a.name] = self._value(v)
            handles = [t.handle for t in tensors_in(bound[a.name])]
            if a.alias_info is not None:
                for alias in a.alias_info.before_set:
                    sets.setdefault(alias, []).extend(handles)
                if a.alias_info.is_write:
                    written.extend(handles)
        returns = list(out) if isinstance(out, (tuple, list)) else [out]
        outs = [self._value(r) for r in returns]
        views: dict[int, int] = {}
        for r, o in zip(schema.returns, outs, strict=False):
            if r.alias_info is not None and isinstance(o, TensorArg):
                for alias in r.alias_info.before_set:
                    for h in sets.get(alias, []):
                        if h != o.handle:
                            views[o.handle] = h
        self.calls.append(Call(func, self.node, bound, outs, written, views))
        return out


class _NodeInterpreter(Interpreter):
    """Runs the graph node by node so each aten op is charged to the node that ran it. A
    submodule kept whole runs its ``forward`` without hooks: a hook must not see fake
    tensors (one that keeps a feature map would keep a fake one)."""

    def __init__(self, module: GraphModule, recorder: _Recorder):
        super().__init__(module, garbage_collect_values=False)
        self.recorder = recorder

    def run_node(self, n: Node) -> Any:
        self.recorder.node = n
        return super().run_node(n)

    def call_module(self, target: Any, args: Any, kwargs: Any) -> Any:
        return self.fetch_attr(target).forward(*args, **kwargs)


class _Runner(nn.Module):
    def __init__(self, body: GraphModule, recorder: _Recorder):
        super().__init__()
        self.body = body
        self.recorder = recorder

    def forward(self, *args: Any) -> Any:
        return _NodeInterpreter(self.body, self.recorder).run(*args)


@dataclass
class _Run:
    batch: int
    recorder: _Recorder
    output: Any
    input_leaves: list[int]  # leaf index (in the bound inputs) of each input handle


@contextlib.contextmanager
def _quiet(logger: str) -> Iterator[None]:
    """A model that fails on fake tensors is refused with the reason: torch's own error log
    of the failure would only repeat it."""
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(level)


def _run(
    body: GraphModule,
    inputs: Sequence[Any],
    batched: Sequence[bool],
    batch: int,
    describe: Callable[[Node | None], str],
    model_name: str,
) -> _Run:
    """Run ``body`` at ``batch`` on fake tensors: batched leaves get that dim-0 size."""
    leaves, spec = tree_flatten(list(inputs))
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    state = {**dict(body.named_parameters()), **dict(body.named_buffers())}
    names = {id(t): name.removeprefix("model.") for name, t in state.items()}
    with mode:
        fake_state = {name: mode.from_tensor(t) for name, t in state.items()}
        fake_names = {id(fake_state[name]): names[id(t)] for name, t in state.items()}
        fakes: list[Any] = []
        for leaf, is_batched in zip(leaves, batched, strict=True):
            if isinstance(leaf, Tensor):
                shape = (batch, *leaf.shape[1:]) if is_batched else tuple(leaf.shape)
                fake = torch.empty(shape, dtype=leaf.dtype, device=leaf.device)
                fakes.append(fake.requires_grad_(leaf.requires_grad and fake.is_floating_point()))
            else:
                fakes.append(leaf)
    batched_fakes = [f for f, b in zip(fakes, batched, strict=True) if b]
    recorder = _Recorder(batched_fakes, fake_names)
    args = spec.unflatten(fakes)
    try:
        with mode, recorder, _quiet("torch._subclasses.fake_tensor"):
            output = torch.func.functional_call(
                _Runner(body, recorder),
                {f"body.{k}": v for k, v in fake_state.items()},
                tuple(args),
                strict=False,
                tie_weights=True,
            )
    except BatchError:
        raise
    except Exception as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise BatchError(
            f"fxfuse.rdrop cannot check how {model_name} treats its batch: running it on fake "
            f"tensors at batch size {batch} failed at {describe(recorder.node)} "
            f"({type(error).__name__}: {message}); rdrop follows the batch through a run "
            "at batch sizes 2 and 3 without data, which this model does not allow"
        ) from error
    input_leaves = [i for i, b in enumerate(batched) if b]
    return _Run(batch, recorder, output, input_leaves)


# --------------------------------------------------------------------------------------------
# What each op does along its dims
# --------------------------------------------------------------------------------------------


class _Refusal(Exception):
    """An op's check failed: the reason, to be completed with where it ran."""


# --------------------------------------------------------------------------------------------
# Following the batch through the two records
# --------------------------------------------------------------------------------------------


@dataclass
class _Follower:
    runs: tuple[_Run, _Run]
    infos: dict[int, Info] = field(default_factory=dict)
    producers: dict[int, Node | None] = field(default_factory=dict)
    mutated: set[int] = field(default_factory=set)
    batch_norms_after_random: list[Node | None] = field(default_factory=list)

    def info(self, handle: int) -> Info:
        found = self.infos.get(handle)
        if found is None:  # first seen as an argument: a parameter, buffer or constant
            v1 = self.runs[0].recorder.values.get(handle)
            v2 = self.runs[1].recorder.values.get(handle)
            if v1 != v2:
                raise _Refusal(
                    f"a tensor made from the batch size ({v1} at batch {SIZES[0]}, {v2} at "
                    f"batch {SIZES[1]}) is computed with; doubling the batch would change it"
                )
            found = Info(state=self.runs[0].recorder.state_names.get(handle))
            self.infos[handle] = found
        return found

    def step(self, k: int) -> None:
        """Check op ``k`` and record where its results hold the batch."""
        c1, c2 = self.runs[0].recorder.calls[k], self.runs[1].recorder.calls[k]
        name = op_name(c1.func)
        if c1.func != c2.func or c1.node is not c2.node or len(c1.outs) != len(c2.outs):
            raise _Refusal(
                f"the ops it runs depend on the batch size ({name} at batch {SIZES[0]}, "
                f"{op_name(c2.func)} at batch {SIZES[1]})"
            )
        kind = kind_of(c1.func)
        op = Op(c1, c2, self.info)
        _check_values(c1, c2, name)
        reads = [(arg, t, self.info(t.handle)) for arg, v in c1.args.items() for t in tensors_in(v)]
        batched = [(arg, t, i.batch) for arg, t, i in reads if i.batch is not None]
        random_in = any(i.random for _, _, i in reads)
        draws = RANDOM in c1.func.tags or (op.arg("dropout_p") or 0) > 0
        if draws and (kind is None or not kind.random):
            raise _Refusal(
                f"{name} draws random numbers in a way rdrop cannot split per sample, so it "
                "cannot promise the two copies independent draws"
            )
        if batched and kind is None:
            _, t, batch = batched[0]
            raise _Refusal(
                f"{name} reads a tensor that holds the batch (dim {batch.dim} of "
                f"{shape_text(t.shape)}), and rdrop does not know whether it keeps samples apart"
            )
        carries_positions = self._positions(op, reads, name)
        if batched:
            assert kind is not None
            self._check_acting(op, kind, batched, name, random_in)
        self._check_writes(c1, kind, batched, name)
        for index, (o1, o2) in enumerate(zip(c1.outs, c2.outs, strict=True)):
            if not isinstance(o1, TensorArg):
                continue
            info = Info(random=random_in or draws, iota=carries_positions)
            old = self.infos.get(o1.handle)
            if old is not None and o1.handle in c1.written:  # in place: the same tensor
                info.state, info.input = old.state, old.input
            if o1.handle in c1.views:
                source = self.info(c1.views[o1.handle])
                info.state, info.input = source.state, source.input
            results = kind.results if kind is not None and kind.results else len(c1.outs)
            if index < results:
                info.batch = self._result_batch(op, kind, batched, reads, o1, o2, name, info)
            if c1.func.overloadpacket is aten.arange and info.batch == Batch(0):
                info.iota = (op.arg("start") or 0) == 0 and (op.arg("step") or 1) == 1
            self.infos[o1.handle] = info
            self.producers[o1.handle] = c1.node

    def _positions(self, op: Op, reads: list[tuple[str, TensorArg, Info]], name: str) -> bool:
        """Whether the op's results hold sample positions (``torch.arange(batch)``)."""
        carries = False
        for arg, _, info in reads:
            if not info.iota:
                continue
            if op.call.func.overloadpacket in (aten.index, aten._unsafe_index) and arg == "indices":
                continue  # _index decides whether it indexes the batch by position
            if op.call.func.overloadpacket in CARRY_POSITIONS:
                carries = True
                continue
            raise _Refusal(
                f"{name} computes with each sample's position in the batch (torch.arange over "
                "it); the second copy's samples sit at other positions"
            )
        return carries

    def _check_acting(
        self,
        op: Op,
        kind: Kind,
        batched: list[tuple[str, TensorArg, Batch]],
        name: str,
        random_in: bool,
    ) -> None:
        acting = kind.acting(op)
        for arg, t, batch in batched:
            if batch.dim not in acting.get(arg, set()):
                continue
            if kind.statistics:
                # batch norm: a batch written twice has the mean and variance it had
                if random_in:
                    self.batch_norms_after_random.append(op.call.node)
                continue
            raise _Refusal(mixing(name, op.call, arg, t, batch))

    def _check_writes(self, call: Call, kind: Kind | None, batched: list[Any], name: str) -> None:
        for handle in call.written:
            target = self.info(handle)
            if target.state is not None and batched and not (kind is not None and kind.statistics):
                raise _Refusal(
                    f"{name} writes values computed from the batch into {target.state!r}; on a "
                    "doubled batch it would write both copies"
                )
            if target.input is not None:
                self.mutated.add(target.input)

    def _result_batch(
        self,
        op: Op,
        kind: Kind | None,
        batched: list[tuple[str, TensorArg, Batch]],
        reads: list[tuple[str, TensorArg, Info]],
        o1: TensorArg,
        o2: TensorArg,
        name: str,
        info: Info,
    ) -> Batch | None:
        """Where a result holds the batch (``None``: it does not)."""
        if kind is not None and kind.reshape and batched:
            arg, t, batch = batched[0]
            other = tensors_in(op.other.args[arg])[0]
            got = (
                _reshaped(batch, t.shape, o1.shape, SIZES[0]),
                _reshaped(batch, other.shape, o2.shape, SIZES[1]),
            )
            if got[0] is None or got[0] != got[1]:
                raise _Refusal(
                    f"{name} reshapes {shape_text(t.shape)} to {shape_text(o1.shape)}, which "
                    "splits the batch across dims"
                )
            return got[0]
        found = _from_shapes(o1.shape, o2.shape, name)
        if found is None:
            if batched and not (kind is not None and (kind.value_free or kind.statistics)):
                _, t, batch = batched[0]
                raise _Refusal(
                    f"{name} turns a tensor that holds the batch ({shape_text(t.shape)}, batch at "
                    f"dim {batch.dim}) into one that does not ({shape_text(o1.shape)}): it reduces "
                    "over the samples or picks some of them"
                )
            if info.random and not (kind is not None and kind.statistics):
                raise _Refusal(
                    f"{name} draws random numbers for a {shape_text(o1.shape)} tensor, without the "
                    "batch: both copies would share the draw, so their dropout would not be "
                    "independent"
                )
            return None
        d, per = found
        if not batched:  # sized by the batch: a factory, an expanded parameter
            return Batch(d, 1, per)
        if kind is not None and kind.value_free:
            same = [b for _, _, b in batched if b.dim == d and b.per_sample == per]
            return same[0] if same else Batch(d, 1, per)
        layouts = {(b.outer, b.inner) for _, _, b in batched}
        outer, inner = next(iter(layouts))
        if len(layouts) > 1 or per != outer * inner:
            _, t, batch = batched[0]
            raise _Refusal(
                f"{name} gives dim {d} of its result {per} elements per sample where its input "
                f"({shape_text(t.shape)}) had {batch.per_sample}: it repeats or interleaves samples"
            )
        return Batch(d, outer, inner)


def _check_values(c1: Call, c2: Call, name: str) -> None:
    """The batch size may size tensors; any other argument that changes with it is refused."""
    schema = {a.name: a for a in c1.func._schema.arguments}
    for arg, v1 in c1.args.items():
        v2 = c2.args.get(arg)
        if tensors_in(v1) or v1 == v2:
            continue
        if arg in SIZE_ARGUMENTS and "int" in str(schema[arg].type):
            continue
        if c1.func.overloadpacket is aten.arange and arg == "end" and (v1, v2) == SIZES:
            continue  # torch.arange(batch): followed as the samples' positions
        raise _Refusal(
            f"{name} uses the batch size as a number ({arg}={v1!r} at batch {SIZES[0]}, "
            f"{v2!r} at batch {SIZES[1]}); doubling the batch would change it"
        )


def _from_shapes(s1: tuple[int, ...], s2: tuple[int, ...], op: str) -> tuple[int, int] | None:
    """The one dim whose size changes with the batch, and its elements per sample (``None``:
    no dim changes)."""
    if len(s1) != len(s2):
        raise _Refusal(f"{op} gives a result whose rank depends on the batch size")
    changed = [d for d in range(len(s1)) if s1[d] != s2[d]]
    if not changed:
        return None
    if len(changed) > 1:
        raise _Refusal(
            f"{op} gives a {shape_text(s1)} tensor at batch {SIZES[0]} and {shape_text(s2)} at "
            f"batch {SIZES[1]}: the batch is in dims {changed}, so it pairs samples with each other"
        )
    d = changed[0]
    per1, rest1 = divmod(s1[d], SIZES[0])
    per2, rest2 = divmod(s2[d], SIZES[1])
    if rest1 or rest2 or per1 != per2:
        raise _Refusal(
            f"{op} gives dim {d} the size {s1[d]} at batch {SIZES[0]} and {s2[d]} at batch "
            f"{SIZES[1]}, not a whole number of elements per sample: it slices, pads or "
            "concatenates along the batch"
        )
    return d, per1


def _reshaped(
    batch: Batch, s_in: tuple[int, ...], s_out: tuple[int, ...], size: int
) -> Batch | None:
    """Where a reshape (row-major order kept) puts the batch; ``None`` where it splits it."""
    step = batch.inner * math.prod(s_in[batch.dim + 1 :])  # elements per sample step
    if step == 0:  # an empty tensor: no element tells where the batch goes
        return None
    for q in range(len(s_out)):
        after = math.prod(s_out[q + 1 :])
        if after <= step < after * s_out[q]:
            if step % after:
                return None
            inner = step // after
            if s_out[q] % (size * inner):
                return None
            return Batch(q, s_out[q] // (size * inner), inner)
    return None


def audit_batch(
    body: GraphModule,
    inputs: Sequence[Any],
    *,
    model_name: str,
    describe: Callable[[Node | None], str] = lambda node: describe_node(node),
) -> BatchAudit:
    """Check that running ``body`` on ``inputs`` written twice along dim 0 computes, for each
    copy, what it computes on ``inputs``; raise :class:`BatchError` with the evidence if not.

    ``inputs`` are the body's positional inputs (pytrees): every tensor leaf with a dim holds
    the batch at dim 0, other leaves are passed as they are. ``describe`` names a node in
    messages. Nothing of the model changes: both runs are on fake tensors, buffers included,
    and no random number is drawn.
    """
    leaves, _ = tree_flatten(list(inputs))
    batched = [isinstance(x, Tensor) and x.dim() > 0 for x in leaves]
    r1, r2 = (_run(body, inputs, batched, b, describe, model_name) for b in SIZES)
    follower = _Follower((r1, r2))
    for handle, leaf in enumerate(r1.input_leaves):
        follower.infos[handle] = Info(batch=Batch(0), input=leaf)
    calls = r1.recorder.calls
    prefix = f"fxfuse.rdrop cannot double the batch of {model_name}"
    if len(calls) != len(r2.recorder.calls):
        raise BatchError(
            f"{prefix}: the ops it runs depend on the batch size ({len(calls)} at batch "
            f"{SIZES[0]}, {len(r2.recorder.calls)} at batch {SIZES[1]})"
        )
    for k in range(len(calls)):
        try:
            follower.step(k)
        except _Refusal as refusal:
            raise BatchError(
                f"{prefix}: {refusal} (at {describe(calls[k].node)}); rdrop needs dim 0 of "
                "every input to be the batch, with no op but batch norm mixing samples — or "
                "call the model twice"
            ) from None
    return BatchAudit(
        outputs=_check_outputs(follower, prefix, body, describe),
        mutated=tuple(sorted(follower.mutated)),
        batch_norms_after_random=tuple(
            describe(n) for n in dict.fromkeys(follower.batch_norms_after_random)
        ),
        ops=len(calls),
    )


def _check_outputs(
    f: _Follower, prefix: str, body: GraphModule, describe: Callable[[Node | None], str]
) -> tuple[bool, ...]:
    """Which output leaves hold the batch at dim 0; :class:`BatchError` for one that holds
    it elsewhere, or depends on the batch size without holding it."""
    r1, r2 = f.runs
    leaves1, spec1 = tree_flatten(r1.output)
    leaves2, spec2 = tree_flatten(r2.output)
    if spec1 != spec2:
        raise BatchError(f"{prefix}: the structure of its output depends on the batch size")
    output = next(n for n in reversed(body.graph.nodes) if n.op == "output")
    written = tree_flatten(output.args[0])[0]  # the nodes returned, where the code shows them
    flags = []
    for index, (a, b) in enumerate(zip(leaves1, leaves2, strict=True)):
        node = written[index] if len(written) == len(leaves1) else None
        handle = r1.recorder.ids.get(id(a)) if isinstance(a, Tensor) else None
        if handle is not None and f.producers.get(handle) is not None:
            node = f.producers[handle]
        leaf = f"output leaf {index}" if len(leaves1) > 1 else "its output"
        what = f"{leaf} (at {describe(node)})" if isinstance(node, Node) else leaf
        if not isinstance(a, Tensor):
            if a != b:
                raise BatchError(
                    f"{prefix}: {what} is {a!r} at batch {SIZES[0]} and {b!r} at batch "
                    f"{SIZES[1]}, a value that depends on the batch size; the twin's would be "
                    "the doubled batch's"
                )
            flags.append(False)
            continue
        info = f.infos.get(handle) if handle is not None else None
        batch = info.batch if info is not None else None
        if batch is None:
            if info is not None and info.random:
                raise BatchError(
                    f"{prefix}: {what} is drawn at random without the batch, so both copies "
                    "would share it"
                )
            flags.append(False)  # a parameter, a constant: the same for both copies
            continue
        if batch.dim != 0 or batch.merged:
            where = f"at dim {batch.dim}" if not batch.merged else "merged with other elements"
            raise BatchError(
                f"{prefix}: {what} ({shape_text(a.shape)} at batch {SIZES[0]}) holds the batch "
                f"{where}; rdrop splits outputs in two along dim 0"
            )
        flags.append(True)
    return tuple(flags)


def describe_node(node: Node | None) -> str:
    """A node as messages name it: the line of the model's code that made it."""
    if node is None:
        return "the start of the model"
    frames = re.findall(r'File "([^"]+)", line (\d+), in \S+\n\s*(.*)', node.stack_trace or "")
    for path, line, code in reversed(frames):
        if not path.startswith(LIBRARY_DIRS):
            return f"`{code.strip()}` ({os.path.basename(path)}:{line})"
    if node.op == "call_module":
        return f"self.{node.target}(...)"
    return f"node {node.name}"


#: Where torch's and fxfuse's own code lives: frames there are not the model's line.
LIBRARY_DIRS = (os.path.dirname(torch.__file__), os.path.dirname(__file__))
