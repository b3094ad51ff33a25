"""fxfuse.effects: what each node may write, alias and draw, asked of the operators themselves."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx import Graph, Node

from fxfuse.capture import Traced, symbolic_capture, trace_part
from fxfuse.effects import Effects, ImpureCall, run_pure


def _effects(model: nn.Module) -> tuple[Graph, Effects, dict[str, Node]]:
    traced = trace_part(model)  # (its root, a copy of model's, holds the tensors forward builds)
    assert isinstance(traced, Traced)
    graph, root = traced.graph, traced.root
    modules = dict(root.named_modules())

    def tensor(node: Node) -> Tensor | None:
        if node.op != "get_attr":
            return None
        owner, _, name = str(node.target).rpartition(".")
        value = getattr(modules[owner] if owner else root, name)
        return value if isinstance(value, Tensor) else None

    effects = Effects(graph, modules.__getitem__, tensor)
    return graph, effects, {n.name: n for n in graph.nodes}


class Writes(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1)
        self.act = nn.ReLU(inplace=True)
        self.register_buffer("buf", torch.ones(2))
        self.register_buffer("other", torch.ones(2))

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        a = self.conv(x) * self.other
        b = a.relu_()
        c = F.relu(y, inplace=True)
        d = self.act(a)
        self.buf.view(-1).mul_(2)
        e = torch.add(a, 1, out=y)
        return b + c + d + e


def test_writes_come_from_schemas_kwargs_and_modules() -> None:
    _, effects, n = _effects(Writes())
    assert effects.writes(n["relu_"]) == (n["mul"],)
    assert effects.writes(n["relu"]) == (n["y"],)  # F.relu(..., inplace=True)
    assert effects.writes(n["act"]) == (n["mul"],)  # nn.ReLU(inplace=True)
    assert effects.writes(n["mul_"]) == (n["view"],)
    assert effects.writes(n["add"]) == (n["y"],)  # out=
    assert effects.writes(n["conv"]) == ()


def test_a_write_through_a_view_is_a_write_of_the_buffer() -> None:
    _, effects, n = _effects(Writes())
    assert effects.written(n["buf"])  # self.buf.view(-1).mul_(2)
    assert effects.storage(n["view"]) == effects.storage(n["buf"])
    assert not effects.written(n["other"])


class Views(nn.Module):
    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        return (
            x.narrow(1, 0, 1),
            x.data,
            x.t(),
            x[:, :1],
            x.reshape(-1),
            x.contiguous(),
            x + 1,
            torch.relu(x),
        )


def test_aliases_come_from_schemas_and_attributes() -> None:
    _, effects, n = _effects(Views())
    x = n["x"]
    for name in ("narrow", "getattr_1", "t", "getitem", "reshape", "contiguous"):
        assert effects.aliases(n[name]) == (x,), name
    assert effects.aliases(n["add"]) == ()
    assert effects.aliases(n["relu"]) == ()


class Random(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4))
        self.drop = nn.Dropout(0.5)

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        return (
            torch.rand_like(x),
            torch.bernoulli(torch.sigmoid(self.w)),
            torch.binomial(torch.ones(4) * 5, torch.sigmoid(self.w)),
            torch._standard_gamma(self.w.abs()),
            self.drop(x),
            torch.sigmoid(x),
        )


def test_randomness_is_the_operators_tag() -> None:
    model = Random()
    _, effects, n = _effects(model.train())
    for name in ("rand_like", "bernoulli", "binomial", "_standard_gamma", "drop"):
        assert effects.random(n[name]), name
        assert not effects.pure(n[name])
    assert not effects.random(n["sigmoid"])
    _, effects, n = _effects(model.eval())
    assert not effects.random(n["drop"])  # eval-mode dropout draws nothing


class Chain(nn.Module):
    """MobileOne's ``out = a + b; out += conv_i(x)``: in place on the graph's own value."""

    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(2, 2, 1) for _ in range(3))

    def forward(self, x: Tensor, acc: Tensor) -> tuple[Tensor, Tensor]:
        out = self.convs[0](x) + x
        out += self.convs[1](x)
        out += self.convs[2](x)
        acc += out
        return out, acc


def test_in_place_on_the_graphs_own_value_is_private_on_a_caller_tensor_not() -> None:
    _, effects, n = _effects(Chain())
    assert effects.private(n["add"], n["iadd"])
    assert effects.private(n["iadd"], n["iadd_1"])
    assert effects.pure(n["iadd"])  # a write nobody sees
    assert not effects.private(n["acc"], n["iadd_2"])  # the caller's tensor
    assert not effects.pure(n["iadd_2"])


def test_a_value_read_after_an_in_place_update_is_not_private() -> None:
    class ReadAfter(nn.Module):
        def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
            y = x + 1
            v = y.view(-1)
            y.add_(2)
            return v * 3, y

    _, effects, n = _effects(ReadAfter())
    assert not effects.private(n["add"], n["add_"])  # v (made before) is read after


def test_first_write_between_sees_writes_through_aliases_only() -> None:
    class Between(nn.Module):
        def forward(self, x: Tensor, z: Tensor) -> Tensor:
            a = torch.sigmoid(x)
            z.relu_()  # another input: may alias x (the caller may pass one tensor twice)
            b = torch.tanh(x)
            c = a + 1
            c.mul_(2)  # the graph's own value, not x
            return a + b + c

    _, effects, n = _effects(Between())
    x = n["x"]
    assert effects.first_write_between(n["sigmoid"], n["add_1"], [x]) is n["relu_"]
    assert effects.first_write_between(n["tanh"], n["add_1"], [x]) is None
    assert effects.first_write_between(n["sigmoid"], n["add_1"], [n["sigmoid"]]) is None


def test_opaque_leaf_modules_may_write_their_inputs_and_own_state() -> None:
    class InplaceSwish(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("calls", torch.zeros(()))

        def forward(self, x: Tensor) -> Tensor:
            self.calls += 1
            return x.mul_(torch.sigmoid(x))

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.act = InplaceSwish()

        def forward(self, x: Tensor) -> Tensor:
            return self.act(x) + self.act.calls

    model = Model()
    graph = symbolic_capture(model, leaf_modules=[InplaceSwish])
    n = {node.name: node for node in graph.nodes}
    modules = dict(model.named_modules())
    effects = Effects(
        graph, modules.__getitem__, lambda node: model.act.calls if node.op == "get_attr" else None
    )
    assert effects.opaque(n["act"])
    assert effects.writes(n["act"]) == (n["x"],)
    assert effects.written(n["act_calls"])  # its own buffer may change on every call


def test_run_pure_refuses_random_ops_and_writes_before_running_them() -> None:
    w = torch.randn(4)
    before = w.clone()
    with pytest.raises(ImpureCall, match="random"):
        run_pure(F.gumbel_softmax, (w,), {})
    with pytest.raises(ImpureCall, match="random"):
        run_pure(torch.binomial, (torch.ones(4), torch.full((4,), 0.5)), {})
    with pytest.raises(ImpureCall, match="writes"):
        run_pure(F.relu, (w,), {"inplace": True})
    assert torch.equal(w, before)
    assert torch.equal(run_pure(torch.mul, (w, 2), {}), w * 2)
    # writing memory it made itself is fine
    assert torch.equal(run_pure(lambda t: torch.zeros_like(t).add_(t), (w,), {}), w)


def test_tracing_keeps_in_place_operators_in_place() -> None:
    class Acc(nn.Module):
        def forward(self, x: Tensor, acc: Tensor) -> Tensor:
            acc += x
            acc[:, 0] = 0
            return acc

    graph = symbolic_capture(Acc())
    targets = [n.target for n in graph.nodes if n.op == "call_function"]
    assert targets == [operator.iadd, operator.setitem]


class BorderWrites(nn.Module):
    """Writes into the border of a pad (a graph's own value), of an input's view, and of a
    pad whose view is also read: in every capture's form (``setitem``; export's ``copy_`` and
    ``fill_`` through ``aten.slice``)."""

    def forward(self, x: Tensor, y: Tensor) -> tuple[Tensor, ...]:
        own = F.pad(x, [1, 1])
        own[:, :, 0:1] = 2.0
        own[:, :, -1:].fill_(2.0)
        mine = y[:, :, 1:]  # a view of the caller's tensor
        mine[:, :, 0:1] = 3.0
        seen = F.pad(x, [2, 2])
        strip = seen[:, :, 0:2]
        strip.fill_(4.0)
        return own.sum(), mine.sum(), strip.sum() + seen.sum()


def _border_nodes(graph: Graph) -> dict[str, Node]:
    """The pads, and the ``y`` view, by order: own, mine, seen."""
    pads = [n for n in graph.nodes if n.target in (F.pad, torch.ops.aten.pad.default)]
    views = [
        n
        for n in graph.nodes
        if n.op == "call_function"
        and n.target in (operator.getitem, torch.ops.aten.slice.Tensor)
        and isinstance(n.args[0], Node)
        and n.args[0].op == "placeholder"
    ]
    return {"own": pads[0], "seen": pads[1], "mine": views[0]}


@pytest.mark.parametrize("capture", ["symbolic", "export"])
def test_writes_nobody_reads_are_only_those_into_the_graphs_own_unread_memory(
    capture: str,
) -> None:
    x, y = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    if capture == "symbolic":
        graph, effects, _ = _effects(BorderWrites())
    else:
        gm = torch.export.export(BorderWrites(), (x, y)).graph_module
        graph = gm.graph
        effects = Effects(graph, lambda name: getattr(gm, name), lambda node: None)
    nodes = _border_nodes(graph)
    own, mine, seen = nodes["own"], nodes["mine"], nodes["seen"]
    (total,) = [u for u in own.users if effects.aliases(u) == ()]  # own.sum()
    writes = effects.unread_writes(own, {total})
    assert writes is not None and len(writes) >= 2
    assert all(effects.storage(w) == effects.storage(own) for w in writes)
    assert sum(bool(effects.writes(w)) for w in writes) == 2  # the setitem/copy_ and fill_
    assert effects.unread_writes(own) is None  # own.sum() still reads it
    assert effects.unread_writes(mine, set(mine.users)) is None  # the caller's memory
    readers = {u for u in seen.users if effects.aliases(u) == ()}
    assert effects.unread_writes(seen, readers) is None  # strip.sum() reads the view
