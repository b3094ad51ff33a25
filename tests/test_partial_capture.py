"""Part by part: ``optimize(model)`` fuses what traces and keeps the rest as the model's code.

The structures here are written from the causes issue #10 lists: a YOLO-style detector whose
``forward(x, *args, **kwargs)`` loops over a layer list with ``from`` indexes (``m.f``,
``m.i``, a ``save`` list), RepConv blocks inside and a head that caches its grid by shape; a
``forward(x, augment=False)`` model; a root that Python-checks a shape.
"""

from __future__ import annotations

import copy
import functools
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import fxfuse
from fxfuse import CaptureError
from fxfuse.testing import count_ops, randomize_batch_norms, relative_error

# -- a YOLO-style detector ----------------------------------------------------------------------


class Conv(nn.Module):
    """Conv, batch norm, in-place SiLU: the detector's building block."""

    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.act = nn.SiLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(self.conv(x)))


class RepConv(nn.Module):
    """3×3 conv-BN + 1×1 conv-BN + identity BN, summed (YOLOv6/v7's RepConv)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.rbr_dense = nn.Sequential(nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c))
        self.rbr_1x1 = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c))
        self.rbr_identity = nn.BatchNorm2d(c)
        self.act = nn.SiLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.rbr_dense(x) + self.rbr_1x1(x) + self.rbr_identity(x))


class Concat(nn.Module):
    def __init__(self, d: int = 1) -> None:
        super().__init__()
        self.d = d

    def forward(self, x: list[Tensor]) -> Tensor:
        return torch.cat(x, self.d)


class Detect(nn.Module):
    """A head that caches its grid by the input's shape: Python on shapes, and a write to
    ``self`` on every new size."""

    stride: Tensor | None = None

    def __init__(self, nc: int, ch: tuple[int, ...]) -> None:
        super().__init__()
        self.no, self.nl = nc + 5, len(ch)
        self.grid = [torch.empty(0)] * self.nl
        self.m = nn.ModuleList(nn.Conv2d(c, self.no, 1) for c in ch)

    def forward(self, x: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        z = []
        for i in range(self.nl):
            x[i] = self.m[i](x[i])
            bs, _, ny, nx = x[i].shape
            x[i] = x[i].view(bs, 1, self.no, ny, nx).permute(0, 1, 3, 4, 2).contiguous()
            if self.grid[i].shape[2:4] != x[i].shape[2:4]:
                self.grid[i] = self._make_grid(nx, ny)
            y = x[i].sigmoid()
            assert self.stride is not None
            xy = (y[..., 0:2] * 2 + self.grid[i]) * self.stride[i]
            z.append(torch.cat((xy, y[..., 2:]), -1).view(bs, -1, self.no))
        return torch.cat(z, 1), x

    @staticmethod
    def _make_grid(nx: int, ny: int) -> Tensor:
        yv, xv = torch.meshgrid(torch.arange(ny), torch.arange(nx), indexing="ij")
        return torch.stack((xv, yv), 2).view(1, 1, ny, nx, 2).float()


def _layers() -> list[tuple[int | list[int], nn.Module]]:
    return [
        (-1, Conv(3, 8, 3, 2)),
        (-1, RepConv(8)),
        (-1, Conv(8, 16, 3, 2)),
        (-1, RepConv(16)),
        (-1, nn.Upsample(scale_factor=2.0)),
        ([-1, 1], Concat()),
        (-1, Conv(24, 8, 1)),
        ([6, 3], Detect(3, (8, 16))),
    ]


class Detector(nn.Module):
    """Layers in a list, each with ``f`` (where its input comes from) and ``i`` (its index);
    ``save`` lists the outputs later layers read. ``forward(x, *args, **kwargs)`` as in the
    detection frameworks (``Proxy object cannot be iterated`` for torch.fx)."""

    def __init__(self) -> None:
        super().__init__()
        layers = _layers()
        for i, (f, m) in enumerate(layers):
            m.f, m.i = f, i  # type: ignore[assignment]
        self.model = nn.Sequential(*[m for _, m in layers])
        self.save = sorted(
            {j for f, _ in layers for j in ([f] if isinstance(f, int) else f) if j != -1}
        )
        self.model[-1].stride = torch.tensor([2.0, 4.0])

    def forward(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(x, dict):
            raise NotImplementedError("training")
        return self.predict(x, *args, **kwargs)

    def predict(self, x: Tensor, profile: bool = False, augment: bool = False) -> Any:
        if augment:
            return self.predict(x.flip(-1))
        y: list[Tensor | None] = []
        for m in self.model:
            if m.f != -1:
                x = y[m.f] if isinstance(m.f, int) else [x if j == -1 else y[j] for j in m.f]
            x = m(x)
            y.append(x if m.i in self.save else None)
        return x


class CheckedDetector(Detector):
    """The same, with a Python check of the input's size at the top: the model's own
    ``forward`` cannot be traced, so it stays Python and reads ``m.f``/``m.i`` of each layer."""

    def forward(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        if x.shape[-1] % 4:
            raise ValueError("the width must be a multiple of 4")
        return super().forward(x, *args, **kwargs)


def _detector(cls: type[Detector] = Detector) -> Detector:
    torch.manual_seed(0)
    return randomize_batch_norms(cls().double().eval())


X = torch.randn(2, 3, 16, 12, dtype=torch.float64)


def _assert_exact(model: nn.Module, fused: nn.Module, *inputs: Any) -> None:
    with torch.no_grad():
        expected, actual = model(*inputs), fused(*inputs)
    assert relative_error(expected, actual) <= 1e-9


@pytest.mark.parametrize("cls", [Detector, CheckedDetector])
def test_detector_fuses_every_block_without_example_inputs(cls: type[Detector]) -> None:
    model = _detector(cls)
    before = count_ops(model, X)
    fused = fxfuse.optimize(model)
    for x in (X, torch.randn(1, 3, 8, 20, dtype=torch.float64)):  # the grid is rebuilt
        _assert_exact(model, fused, x)
        _assert_exact(model, fused, x)
    after = count_ops(fused, X)
    assert (before["conv"], before["batch_norm"]) == (9, 9)
    # what a hand-written converter gives: one conv per Conv and per RepConv, the head's two
    assert (after["conv"], after["batch_norm"]) == (7, 0)
    report = fused.fxfuse_report
    assert (report.before.convs, report.before.batch_norms) == (9, 9)
    assert (report.after.convs, report.after.batch_norms) == (7, 0)
    kept = {p.path: p.reason for p in report.parts if p.kind == "python"}
    assert "model.7" in kept and "model.7.m" in kept  # the head's Python, its ModuleList


def test_a_detector_kept_as_python_still_reads_its_layers_attributes() -> None:
    model = _detector(CheckedDetector)
    fused = fxfuse.optimize(model)
    assert isinstance(fused, CheckedDetector) and fused is not model
    assert [(m.f, m.i) for m in fused.model] == [(m.f, m.i) for m in model.model]
    assert isinstance(fused.model[1], RepConv)  # the class kept: its fused graph answers as it
    assert fused.save == model.save and fused.save is not model.save
    with pytest.raises(ValueError, match="multiple of 4"):
        fused(torch.randn(1, 3, 8, 10, dtype=torch.float64))


def test_a_result_part_by_part_deep_copies_and_saves(tmp_path: Path) -> None:
    model = _detector(CheckedDetector)
    fused = fxfuse.optimize(model)
    twin = copy.deepcopy(fused)
    torch.save(fused, tmp_path / "fused.pt")  # (pickling recompiles each graph part)
    loaded = torch.load(tmp_path / "fused.pt", weights_only=False)
    for candidate in (fused, twin, loaded, twin):
        _assert_exact(model, candidate, X)
    assert isinstance(twin.model[1], RepConv) and twin.model[1] is not fused.model[1]
    assert count_ops(loaded, X)["batch_norm"] == 0


def test_the_callers_detector_and_inputs_are_never_changed() -> None:
    model = _detector()
    head = model.model[-1]
    grids = list(head.grid)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = X.clone()
    fused = fxfuse.optimize(model, (x,))
    fused(x)
    fused(torch.randn(1, 3, 4, 8, dtype=torch.float64))
    assert all(a is b for a, b in zip(head.grid, grids, strict=True))  # still the caller's
    assert torch.equal(x, X)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert not any(
        p.data_ptr() == q.data_ptr() for p in fused.parameters() for q in model.parameters()
    )


def test_a_call_with_arguments_the_capture_did_not_see_raises() -> None:
    fused = fxfuse.optimize(_detector())
    assert count_ops(fused, X)["conv"] == 7
    with pytest.raises(TypeError, match=r"without further arguments.*augment="):
        fused(X, augment=True)


# -- Python flags with defaults -----------------------------------------------------------------


class FlagHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = RepConv(4)
        self.conv, self.bn = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x: Tensor, augment: bool = False, scale: float = 1.0) -> Tensor:
        if augment:
            x = torch.cat([x, x.flip(-1)])
        return self.bn(self.conv(self.block(x))) * scale


def test_flag_defaults_are_made_concrete_and_guarded() -> None:
    model = randomize_batch_norms(FlagHead().double().eval())
    x = torch.randn(2, 4, 7, 6, dtype=torch.float64)
    fused = fxfuse.optimize(model)
    assert fused.fxfuse_report.capture == "torch.fx.symbolic_trace"
    for call in ((x,), (x, False), (x, False, 1.0)):
        _assert_exact(model, fused, *call)
    _assert_exact(model, lambda y: fused(y, augment=False), x)
    ops = count_ops(fused, x)
    assert (ops["conv"], ops["batch_norm"]) == (2, 0)
    with pytest.raises(AssertionError, match="augment has been specialized to have value False"):
        fused(x, augment=True)
    with pytest.raises(AssertionError, match=r"scale has been specialized to have value 1\.0"):
        fused(x, False, 2.0)


def test_a_flag_given_in_the_example_inputs_is_the_one_fused() -> None:
    model = randomize_batch_norms(FlagHead().double().eval())
    x = torch.randn(1, 4, 5, 5, dtype=torch.float64)
    fused = fxfuse.optimize(model, (x, True))
    _assert_exact(model, fused, x, True)
    with pytest.raises(AssertionError, match="augment has been specialized to have value True"):
        fused(x)


# -- leaves are fused on their own --------------------------------------------------------------


class ShapeGate(nn.Module):
    """Python on a shape, around two fusable blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = Conv(4, 4, 3), RepConv(4)

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        if h == w:
            return self.b(self.a(x))
        return self.a(x)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = Conv(3, 4, 3)
        self.gate = ShapeGate()
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.gate(self.stem(x)))


def test_fusion_inside_a_leaf_and_counts_inside_it() -> None:
    model = randomize_batch_norms(Net().double().eval())
    fused = fxfuse.optimize(model)
    for x in (torch.randn(1, 3, 6, 6, dtype=torch.float64), torch.randn(2, 3, 5, 7).double()):
        _assert_exact(model, fused, x)
    x = torch.randn(1, 3, 6, 6, dtype=torch.float64)
    before, after = count_ops(model, x), count_ops(fused, x)
    assert (before["conv"], before["batch_norm"]) == (4, 6)
    # stem and a fold, b merges; the top-level BN reads the leaf's output: nothing absorbs it
    assert (after["conv"], after["batch_norm"]) == (3, 1)
    report = fused.fxfuse_report
    assert (report.before.convs, report.before.batch_norms) == (4, 6)
    assert (report.after.convs, report.after.batch_norms) == (3, 1)
    kinds = {p.path: p.kind for p in report.parts}
    assert kinds == {"": "graph", "gate": "python", "gate.a": "graph", "gate.b": "graph"}


def test_the_report_of_many_parts_reads_in_a_few_lines() -> None:
    blocks = nn.Sequential(*(ShapeGate() for _ in range(24)))
    model = randomize_batch_norms(blocks.double().eval())
    fused = fxfuse.optimize(model)
    x = torch.randn(1, 4, 5, 5, dtype=torch.float64)
    _assert_exact(model, fused, x)
    report = fused.fxfuse_report
    assert len(report.parts) == 1 + 24 * 3 and len(report.declines) == 0
    text = str(report)
    assert len(text.splitlines()) < 25, text
    assert "ShapeGate ×24 (0, 1, …): Python control flow on a traced value" in text
    assert "RepConv ×24 (0.b, 1.b, …): convs 48 → 24, batch norms 72 → 0" in text
    assert (report.after.convs, report.after.batch_norms) == (48, 0)
    assert count_ops(fused, x)["conv"] == 48


def test_user_leaf_modules_are_fused_on_their_own() -> None:
    model = randomize_batch_norms(Net().double().eval())
    fused = fxfuse.optimize(model, leaf_modules=[Conv])
    x = torch.randn(1, 3, 6, 6, dtype=torch.float64)
    _assert_exact(model, fused, x)
    assert count_ops(fused, x)["batch_norm"] == 1  # the Conv leaves' BNs fold inside them
    graphs = {p.path for p in fused.fxfuse_report.parts if p.kind == "graph"}
    assert {"stem", "gate.a"} <= graphs


# -- hooks (#9 item 3) --------------------------------------------------------------------------


@pytest.mark.parametrize("example", [False, True])
@pytest.mark.parametrize("cls", [FlagHead, ShapeGate])
def test_root_hooks_are_kept_on_the_result(cls: type[nn.Module], example: bool) -> None:
    model = randomize_batch_norms(cls().eval())
    model.register_forward_pre_hook(lambda m, args: (args[0] * 2,))
    model.register_forward_hook(lambda m, args, out: out + 1)
    x = torch.randn(1, 4, 6, 6)
    fused = fxfuse.optimize(model, (x,) if example else None)
    for y in (x, torch.randn(2, 4, 5, 5)):
        assert relative_error(model(y), fused(y)) <= 1e-5
    assert count_ops(fused, x)["batch_norm"] == 0


def test_export_is_not_kept_where_it_would_narrow_the_inputs() -> None:
    model = randomize_batch_norms(ShapeGate().eval())
    fused = fxfuse.optimize(model, (torch.randn(1, 4, 6, 6),))  # export would tie h == w
    report = fused.fxfuse_report
    assert report.capture.endswith("part by part") and report.specialized == []
    assert any(
        "x.shape[2] == x.shape[3]" in note and "part by part" in note for note in report.notes
    )
    for x in (torch.randn(1, 4, 6, 6), torch.randn(2, 4, 5, 7)):
        assert relative_error(model(x), fused(x)) <= 1e-5


@pytest.mark.parametrize("example", [False, True])
def test_a_feature_hook_keeps_firing_and_never_sees_a_proxy(example: bool) -> None:
    model = randomize_batch_norms(Net().eval())
    seen: list[Any] = []
    model.gate.register_forward_hook(lambda m, args, out: seen.append(out))
    shapes: list[Any] = []  # a partial holding the user's list: shared, never copied
    model.gate.a.register_forward_hook(functools.partial(_record_shape, shapes))
    fused = fxfuse.optimize(model, (torch.randn(1, 3, 6, 6),) if example else None)
    assert seen == [] == shapes  # capturing is not calling: no Proxy or fake reached them
    x = torch.randn(1, 3, 6, 6)
    for _ in range(2):
        expected = model(x)
        actual = fused(x)
        assert relative_error(expected, actual) <= 1e-5
    assert len(seen) == 4 and all(type(t) is Tensor for t in seen)
    assert shapes == [(1, 4, 6, 6)] * 4
    assert relative_error(seen[0], seen[1]) <= 1e-5  # the fused model's hook saw the same
    # gate.b still fuses inside the hooked gate; gate.a, hooked too, is its own code around
    # torch.nn layers (its BN stays), and the top-level BN reads the gate: 2 of 6 run
    assert count_ops(fused, x)["batch_norm"] == 2


def _record_shape(store: list[Any], module: nn.Module, args: Any, out: Tensor) -> None:
    store.append(tuple(out.shape))


def test_a_global_hook_sees_no_tracing_objects() -> None:
    seen: list[Any] = []
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda m, args, out: seen.append(type(out))
    )
    try:
        fxfuse.optimize(Net().eval())
    finally:
        handle.remove()
    assert all(t is Tensor or t is tuple for t in seen)


# -- the caller's state (#9 items 9, 10, 11) ----------------------------------------------------


class Locked(nn.Module):
    """Holds a lock (which cannot be deep-copied); ``python`` makes its own forward Python."""

    def __init__(self, python: bool) -> None:
        super().__init__()
        self.lock, self.python = threading.Lock(), python
        self.conv, self.bn = nn.Conv2d(3, 3, 3), nn.BatchNorm2d(3)

    def forward(self, x: Tensor) -> Tensor:
        if self.python and x.shape[-1] < 0:
            raise ValueError
        return self.bn(self.conv(x)).relu()


@pytest.mark.parametrize("how", ["python", "hooked", "kept layer"])
def test_an_attribute_that_cannot_be_copied_is_shared(how: str) -> None:
    model = nn.Sequential(Locked(python=how == "python"), nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))
    model = randomize_batch_norms(model.eval())
    if how == "hooked":
        model[0].register_forward_hook(lambda m, args, out: None)
    if how == "kept layer":  # a torch.nn layer with hooks is kept whole, copied as it is
        model[1].lock = threading.Lock()
        model[1].register_forward_pre_hook(lambda m, args: None)
    fused = fxfuse.optimize(model)
    x = torch.randn(1, 3, 6, 6)
    assert relative_error(model(x), fused(x)) <= 1e-5
    kept = fused.get_submodule("1" if how == "kept layer" else "0")
    original = model[1] if how == "kept layer" else model[0]
    assert kept.lock is original.lock  # shared, said so, and everything else copied
    assert kept.conv.weight is not original.conv.weight if how != "kept layer" else True
    assert any("lock" in note and "shares it" in note for note in fused.fxfuse_report.notes)
    assert count_ops(fused, x)["batch_norm"] == 1  # the top-level one reads a hooked layer


@pytest.mark.parametrize("name", ["graph", "meta", "code", "_code", "_graph", "fxfuse_report"])
def test_submodules_named_like_graph_module_attributes(name: str) -> None:
    model = nn.Sequential()
    model.add_module(name, nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    model.add_module("act", nn.ReLU())
    model = randomize_batch_norms(model.eval())
    fused = fxfuse.optimize(model)
    x = torch.randn(1, 3, 6, 6)
    assert relative_error(model(x), fused(x)) <= 1e-5
    assert count_ops(fused, x)["batch_norm"] == 0
    assert fused.fxfuse_report.counts["fold-bn"] == 1


class BuildsATensor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x) * torch.tensor([1.0, 2.0]).view(1, 2, 1, 1)


def test_tracing_adds_nothing_to_the_callers_model() -> None:
    model = BuildsATensor().eval()
    attributes = set(vars(model))
    for _ in range(2):
        fused = fxfuse.optimize(model)
        x = torch.randn(1, 2, 3, 3)
        assert relative_error(model(x), fused(x)) <= 1e-6
    assert set(vars(model)) == attributes


class Normalizes(nn.Module):
    """Normalizes its input in place, as some preprocessing does."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 3), nn.BatchNorm2d(3)

    def forward(self, x: Tensor) -> Tensor:
        x.sub_(x.mean())
        return self.bn(self.conv(x))


def test_example_inputs_are_never_handed_to_a_run_that_changes_them() -> None:
    model = randomize_batch_norms(Normalizes().eval())
    x0 = torch.randn(1, 3, 6, 6) + 3
    original = x0.clone()
    fxfuse.verify(model, model, (x0,), examples=3)  # not NondeterministicError
    fused = fxfuse.optimize(model, (x0,), verify={"examples": 3})
    assert torch.equal(x0, original)
    assert fused.fxfuse_report.verification.examples == 4


# -- what nothing can capture -------------------------------------------------------------------


class Opaque(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

    def forward(self, x: Tensor) -> Tensor:
        y = self.bn(self.conv(x))
        return y if y.sum() > 0 else -y


def test_the_capture_error_is_one_line_and_the_hint_that_applies() -> None:
    with pytest.raises(CaptureError) as info:
        fxfuse.optimize(Opaque().eval())
    error = info.value
    assert "\n" not in error.message and "Opaque" in error.message
    assert "if y.sum() > 0" not in error.message or "test_partial_capture.py" in error.message
    assert "example inputs" in error.hint and "leaf_modules" not in str(error)
    with pytest.raises(CaptureError) as info:
        fxfuse.optimize(Opaque().eval(), (torch.randn(1, 3, 4, 4),))
    assert "example inputs" not in info.value.hint and "torch.compile" in info.value.hint
    assert "--debug" in info.value.cli_hint and "leaf_modules" not in info.value.cli_hint


# -- torch.nn containers under a module kept as Python ------------------------------------------


def _conv_bn(c: int, k: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c, c, k, padding=k // 2), nn.BatchNorm2d(c))


class FlipsOnSign(nn.Module):
    """Python on a value around two plain ``Sequential(conv, BN)``; its methods name their
    instance ``s``, not ``self``."""

    def __init__(s) -> None:  # (the instance's name is what is tested)
        super().__init__()
        s.body, s.head = _conv_bn(4, 3), _conv_bn(4, 1)

    def forward(s, x: Tensor) -> Tensor:
        if x.sum() > 0:
            x = -x
        return s.head(s.body(x))


def _state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("example", [False, True])
def test_sequentials_under_python_are_fused_parts(example: bool) -> None:
    torch.manual_seed(0)
    model = randomize_batch_norms(FlipsOnSign().double().eval())
    state, layers = _state(model), list(model.modules())
    xs = [torch.randn(2, 4, 7, 6, dtype=torch.float64), -torch.rand(1, 4, 5, 5).double()]
    fused = fxfuse.optimize(model, (xs[0],) if example else None)
    for x in xs:  # both sides of the branch
        _assert_exact(model, fused, x)
    assert (count_ops(model, xs[0])["conv"], count_ops(model, xs[0])["batch_norm"]) == (2, 2)
    assert (count_ops(fused, xs[0])["conv"], count_ops(fused, xs[0])["batch_norm"]) == (2, 0)
    kinds = {p.path: p.kind for p in fused.fxfuse_report.parts}
    assert kinds == {"": "python", "body": "graph", "head": "graph"}
    assert isinstance(fused, FlipsOnSign) and fused.body is not model.body
    assert list(model.modules()) == layers and model.training is False
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


class SeparateConvBN(nn.Module):
    """Near miss: its conv and BN are called one by one from Python (a test between them),
    so they cannot fold; the ``Sequential`` after them still fuses."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.head = (
            nn.Conv2d(4, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            _conv_bn(4, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(x)
        if y.sum() > 0:
            y = -y
        return self.head(self.bn(y))


def test_layers_python_calls_one_by_one_stay_and_the_report_says_why() -> None:
    torch.manual_seed(0)
    model = randomize_batch_norms(SeparateConvBN().double().eval())
    fused = fxfuse.optimize(model)
    x = torch.randn(1, 4, 5, 6, dtype=torch.float64)
    _assert_exact(model, fused, x)
    assert (count_ops(fused, x)["conv"], count_ops(fused, x)["batch_norm"]) == (2, 1)
    report = fused.fxfuse_report
    assert {p.path: p.kind for p in report.parts} == {"": "python", "head": "graph"}
    assert (report.after.convs, report.after.batch_norms) == (2, 1)
    assert any("conv, bn not fused: Python code calls them one by one" in n for n in report.notes)
    assert "conv, bn not fused" in str(report)


class IteratesItsBody(nn.Module):
    """Near miss: Python walks the ``Sequential`` itself (``m.body``, whatever the instance is
    called), so each layer stays a module of its own."""

    def __init__(m) -> None:
        super().__init__()
        m.body, m.head = _conv_bn(4, 3), _conv_bn(4, 1)

    def forward(m, x: Tensor) -> Tensor:
        for layer in m.body:
            x = layer(x)
            if x.sum() > 0:
                x = -x
        return m.head(x)


def test_a_sequential_python_iterates_stays_python() -> None:
    torch.manual_seed(0)
    model = randomize_batch_norms(IteratesItsBody().double().eval())
    fused = fxfuse.optimize(model)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    _assert_exact(model, fused, x)
    assert (count_ops(fused, x)["conv"], count_ops(fused, x)["batch_norm"]) == (2, 1)
    parts = {p.path: p for p in fused.fxfuse_report.parts}
    assert {k: p.kind for k, p in parts.items()} == {
        "": "python",
        "body": "python",
        "head": "graph",
    }
    assert "uses it as a sequence" in parts["body"].reason
    assert isinstance(fused.body[0], nn.Conv2d) and fused.body[0] is not model.body[0]


class Stages(nn.Module):
    """A ``ModuleList`` of plain ``Sequential`` stages that Python iterates, testing a value
    between them."""

    def __init__(self) -> None:
        super().__init__()
        self.stages = nn.ModuleList(
            nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
            for _ in range(3)
        )

    def forward(self, x: Tensor) -> Tensor:
        for stage in self.stages:
            x = stage(x)
            if x.mean() > 1:
                x = x / 2
        return x


def test_sequentials_in_a_module_list_python_iterates_are_fused() -> None:
    torch.manual_seed(0)
    model = randomize_batch_norms(Stages().double().eval())
    fused = fxfuse.optimize(model)
    for x in (torch.randn(1, 4, 5, 5, dtype=torch.float64), 3 + torch.rand(2, 4, 6, 4).double()):
        _assert_exact(model, fused, x)
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    assert (count_ops(fused, x)["conv"], count_ops(fused, x)["batch_norm"]) == (3, 0)
    kinds = {p.path: p.kind for p in fused.fxfuse_report.parts}
    assert kinds == {"": "python", "stages": "python", **{f"stages.{i}": "graph" for i in range(3)}}
    assert all(s is not o for s, o in zip(fused.stages, model.stages, strict=True))


class CachesPerDevice(nn.Module):
    """Fills a dict in ``forward`` (timm's attention caches its biases per device so)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2)
        self.cache: dict[str, Tensor] = {}

    def forward(self, x: Tensor) -> Tensor:
        key = str(x.device)
        if key not in self.cache:
            self.cache[key] = self.conv.weight.sum()
        return self.bn(self.conv(x)) * self.cache[key]


def test_no_tracing_object_reaches_the_callers_containers() -> None:
    model = randomize_batch_norms(CachesPerDevice().eval())
    fused = fxfuse.optimize(model)
    assert model.cache == {}
    x = torch.randn(1, 2, 3, 3)
    assert relative_error(model(x), fused(x)) <= 1e-5
    assert list(model.cache) == ["cpu"] and type(model.cache["cpu"]) is Tensor
    assert count_ops(fused, x)["batch_norm"] == 0


# -- real models that torch.fx cannot trace whole (slow) -----------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", ["efficientvit_m0", "tiny_vit_5m_224", "efficientvit_b0"])
def test_timm_hybrids_fuse_without_example_inputs(name: str) -> None:
    timm = pytest.importorskip("timm")
    from timm.utils.model import reparameterize_model

    torch.manual_seed(0)
    model = randomize_batch_norms(timm.create_model(name).eval()).double()
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    fused = fxfuse.optimize(model)
    theirs = reparameterize_model(copy.deepcopy(model)).double()  # (its new layers are float32)
    _assert_exact(model, fused, x)
    ours, timm_ops = count_ops(fused, x), count_ops(theirs, x)
    assert ours["conv"] <= timm_ops["conv"]
    # efficientvit_m0's head is BatchNorm1d -> Linear, a batch norm *before* its layer: timm folds
    # it forward into the Linear, and so does fold-affine-into-layer
    assert ours["batch_norm"] <= timm_ops["batch_norm"]
    report = fused.fxfuse_report
    assert (report.after.convs, report.after.batch_norms) == (ours["conv"], ours["batch_norm"])
    assert len(str(report).splitlines()) < 40  # a summary, not a dump


def _detector_outputs(model: nn.Module, images: list[Tensor], watched: list[str]) -> list[Any]:
    """What ``watched`` submodules return (before NMS and post-processing) on ``images``."""
    seen: list[Any] = []
    handles = [
        model.get_submodule(path).register_forward_hook(lambda m, a, out: seen.append(out))
        for path in watched
    ]
    try:
        with torch.no_grad():
            model(images)
    finally:
        for handle in handles:
            handle.remove()
    return seen


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "watched", "ops", "sizes"),
    [
        ("fasterrcnn_mobilenet_v3_large_fpn", ["backbone", "rpn.head"], (75, 46), (160, 200)),
        ("ssdlite320_mobilenet_v3_large", ["backbone", "head"], (98, 70), None),  # (320)
    ],
)
def test_torchvision_detectors_fuse_part_by_part(
    name: str, watched: list[str], ops: tuple[int, int], sizes: tuple[int, int] | None
) -> None:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    small = {} if sizes is None else {"min_size": sizes[0], "max_size": sizes[1]}
    model = torchvision.models.get_model(name, weights=None, weights_backbone=None, **small)
    model = randomize_batch_norms(model.eval()).double()
    fused = fxfuse.optimize(model)
    images = [torch.rand(3, 160, 128, dtype=torch.float64)]
    expected = _detector_outputs(model, images, watched)
    actual = _detector_outputs(fused, images, watched)
    assert len(expected) == len(actual) == len(watched)
    assert relative_error(expected, actual) <= 1e-9
    before, after = count_ops(model, images), count_ops(fused, images)
    assert (before["conv"], before["batch_norm"]) == ops
    assert (after["conv"], after["batch_norm"]) == (ops[0], 0)
    assert type(fused) is type(model) and fused.transform is not model.transform


# -- the command line takes the same route ------------------------------------------------------

DETECTOR_FILE = f"""
import sys
sys.path.insert(0, {str(Path(__file__).parents[1])!r})
from tests.test_partial_capture import CheckedDetector


def make():
    return CheckedDetector()
"""


def test_inspect_shows_the_parts_optimize_captures(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fxfuse.cli import main

    path = tmp_path / "detector.py"
    path.write_text(DETECTOR_FILE)
    assert main(["inspect", f"{path}:make", "--input-shape", "1,3,32,32"]) == 0
    out = capsys.readouterr().out
    assert "captured with torch.fx.symbolic_trace, part by part" in out
    assert "6 parts captured as graphs (1 without a conv or batch norm not shown)" in out
    row = next(line for line in out.splitlines() if line.startswith("model.1 "))
    assert row.split()[:6] == ["model.1", "RepConv", "2", "3", "1", "0"]
    assert "model.7 (Detect): Python control flow on a traced value at" in out
    assert "`if self.grid[i].shape[2:4] != x[i].shape[2:4]:`" in out
    assert "convs 9 → 7, batch norms 9 → 0" in out
