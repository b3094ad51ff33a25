"""Effects: what each node of a graph may do besides computing its value.

A rewrite replaces values; it must not change *when* or *whether* an effect happens, nor what a
read sees (docs/design.md, "Effects"). This module answers, for any node of a ``torch.fx``
graph in any dialect fxfuse reads (modules, ``torch``/``F`` functions and tensor methods, aten ops):

- :meth:`Effects.writes`: the inputs it may change in place — aten schemas that mark an argument
  written, ``_``-suffixed ops, ``out=``, ``inplace=True``, ``x += y``, ``x[i] = v``, modules built
  with ``inplace=True``, and any *opaque* call (a leaf module, a function fxfuse does not know),
  which may write every tensor it is given;
- :meth:`Effects.aliases`: the inputs its result may share storage with (views: ``narrow``,
  ``view``, ``x[...]``, ``.data``, ``.t()``; ``reshape``/``contiguous``/``to`` when they can;
  ``nn.Identity``), from the operator's schema where there is one;
- :meth:`Effects.random`: whether it draws random numbers — the operator's
  ``torch.Tag.nondeterministic_seeded``, never its name;
- storage classes: values that may share memory, so a write through one alias (``self.buf
  .view(-1).mul_(2)``, ``y.narrow(1, 0, C).add_(…)``) is seen as a write of every other.

Questions the rules ask are then one call each: is a weight constant (:meth:`written`), may a read
move past this op (:meth:`first_write_between`), may an in-place op be computed out of place
(:meth:`private`), may a dead node be erased (:meth:`pure`).

Unknown code is assumed to do the worst: a call fxfuse cannot resolve may write its tensor
arguments, alias them and draw random numbers. ``torch``'s own Python functions
(``torch.nn.functional``) write their inputs only where their API says so (``inplace=True``).
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.fx import Graph, Node
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = [
    "Effects",
    "ImpureCall",
    "reads_metadata_only",
    "register_pure",
    "run_pure",
    "value_users",
]

aten = torch.ops.aten

_IN_PLACE_OPERATORS = frozenset(
    {
        operator.setitem,
        operator.iadd,
        operator.isub,
        operator.imul,
        operator.itruediv,
        operator.ifloordiv,
        operator.imod,
        operator.ipow,
        operator.iand,
        operator.ior,
        operator.ixor,
        operator.ilshift,
        operator.irshift,
        operator.imatmul,
    }
)
# pure Python operators: on tensors they dispatch to out-of-place aten ops
_PURE_OPERATORS = frozenset(
    {
        operator.add,
        operator.sub,
        operator.mul,
        operator.truediv,
        operator.floordiv,
        operator.mod,
        operator.pow,
        operator.neg,
        operator.pos,
        operator.abs,
        operator.matmul,
        operator.and_,
        operator.or_,
        operator.xor,
        operator.invert,
        operator.lshift,
        operator.rshift,
        operator.eq,
        operator.ne,
        operator.lt,
        operator.le,
        operator.gt,
        operator.ge,
        operator.not_,
        operator.truth,
        getattr,  # (attributes and items that alias are handled first)
        operator.getitem,
        len,
        int,
        float,
        bool,
    }
)
_ALIASING_ATTRIBUTES = frozenset({"data", "T", "mT", "H", "mH", "real", "imag"})
_METADATA_ATTRIBUTES = frozenset(
    {"shape", "ndim", "dtype", "device", "is_cuda", "layout", "requires_grad"}
)
_METADATA_METHODS = frozenset({"size", "dim", "ndimension", "numel", "stride", "get_device"})
_ATEN_METADATA = frozenset({aten.sym_size.int, aten.sym_numel.default, aten.sym_stride.int})

# modules of torch.nn whose forward returns its input or a view of it
_ALIASING_MODULES = (nn.Identity, nn.Flatten, nn.Unflatten, nn.modules.dropout._DropoutNd)
# modules of torch.nn that draw random numbers in training mode
_RANDOM_MODULES = (nn.modules.dropout._DropoutNd, nn.RReLU)


_SHAPE_OF_OTHER_METHODS = frozenset({"reshape_as", "view_as", "expand_as", "type_as"})
_LIKE_FUNCTIONS = frozenset({torch.zeros_like, torch.ones_like, torch.empty_like})
_NEW_METHODS = frozenset({"new_zeros", "new_ones", "new_empty", "new_full"})


_METADATA_OR_SHAPE_METHODS = _SHAPE_OF_OTHER_METHODS | _NEW_METHODS | _METADATA_METHODS


def reads_metadata_only(user: Node, of: Node) -> bool:
    """Whether ``user`` only asks ``of`` for its shape, rank, dtype or device.

    Such a read (``x.shape``, ``x.ndim`` in a ``torch._assert``, ``x.size(1)``,
    ``y.reshape_as(x)``, ``torch.zeros_like(x)``) does not need the value: it can read the same
    facts from anything of the same shape and dtype.
    """
    op, target = user.op, user.target
    if op == "call_method":
        if target not in _METADATA_OR_SHAPE_METHODS:
            return False
    elif op != "call_function" or not (
        target is getattr or target in _LIKE_FUNCTIONS or target in _ATEN_METADATA
    ):
        return False  # (most users: checked first, this runs for every user of every node)
    others = [*user.args[1:], *user.kwargs.values()]
    if user.op == "call_method" and user.target in _SHAPE_OF_OTHER_METHODS:
        return len(user.args) == 2 and user.args[1] is of and user.args[0] is not of
    if user.op == "call_method" and user.target in _NEW_METHODS:
        return bool(user.args) and user.args[0] is of and of not in others
    if user.op == "call_function" and user.target in _LIKE_FUNCTIONS:
        return bool(user.args) and user.args[0] is of and of not in others
    if user.op == "call_function" and user.target is getattr:
        return len(user.args) == 2 and user.args[0] is of and user.args[1] in _METADATA_ATTRIBUTES
    if user.op == "call_function" and user.target in _ATEN_METADATA:
        return bool(user.args) and user.args[0] is of and of not in user.args[1:]
    if user.op == "call_method" and user.target in _METADATA_METHODS:
        args = [*user.args[1:], *user.kwargs.values()]
        return bool(user.args) and user.args[0] is of and of not in args
    return False


def value_users(node: Node) -> list[Node]:
    """The users of ``node`` that read its values (not only its shape or dtype)."""
    return [u for u in node.users if not reads_metadata_only(u, node)]


def _tensor_inputs(node: Node) -> tuple[Node, ...]:
    """The input nodes of ``node`` that may hold tensors (all but metadata-only reads)."""
    return tuple(n for n in node.all_input_nodes if not _holds_no_tensor(n))


def _holds_no_tensor(node: Node) -> bool:
    """Nodes that certainly hold Python values, not tensors (shapes, sizes, dtypes)."""
    if node.op == "call_function" and node.target is getattr and len(node.args) == 2:
        return node.args[1] in _METADATA_ATTRIBUTES
    if node.op == "call_method" and node.target in _METADATA_METHODS:
        return True
    return node.op == "call_function" and node.target in _ATEN_METADATA


# --------------------------------------------------------------------------------------------
# What an operator's schema says
# --------------------------------------------------------------------------------------------


Argument = tuple[int, str]  # (position, name) of an argument in an operator's schema


class _OpInfo:
    """Effects of one callable, resolved once: which arguments it writes and which its result
    aliases (``None``: unknown), whether it is random (``None``: unknown), and whether it is
    known at all (an unknown callable may do anything)."""

    __slots__ = ("aliases", "known", "random", "writes")

    def __init__(
        self,
        writes: frozenset[Argument] | None,
        aliases: frozenset[Argument] | None,
        random: bool | None,
        known: bool,
    ):
        self.writes, self.aliases, self.random, self.known = writes, aliases, random, known


_FIRST: frozenset[Argument] = frozenset({(0, "self")})
_UNKNOWN = _OpInfo(None, None, None, False)
_PURE = _OpInfo(frozenset(), frozenset(), False, True)


def _schema_info(overloads: Sequence[Any]) -> _OpInfo:
    """The union of what the overloads' schemas say (an overload is chosen at run time).

    ``out=`` overloads are left out: a call passes ``out=`` explicitly, which
    :meth:`Effects.writes` sees on its own."""
    writes: set[Argument] = set()
    aliases: set[Argument] = set()
    random = False
    for op in overloads:
        schema = op._schema
        if schema.overload_name.startswith("out") or schema.overload_name.endswith("_out"):
            continue
        tags = getattr(op, "tags", ())
        random = random or torch.Tag.nondeterministic_seeded in tags
        returned: set[str] = set()
        for a in schema.returns:
            if a.alias_info is not None:
                returned |= set(a.alias_info.before_set)
        for index, arg in enumerate(schema.arguments):
            info = arg.alias_info
            if info is None:
                continue
            position = (-1 if arg.kwarg_only else index, arg.name)
            if info.is_write:
                writes.add(position)
            # ``Tensor(a -> *) self ... -> Tensor(a)[]`` (chunk, split, unbind): the views are
            # the returned list's elements, whose annotation the bindings do not show; the
            # argument's ``-> *`` (it may alias anything after the call) does
            if set(info.before_set) & returned or "*" in set(info.after_set):
                aliases.add(position)
        unannotated_views = schema.name.startswith(("aten::unsafe_split", "aten::unsafe_chunk"))
        if (torch.Tag.maybe_aliasing_or_mutating in tags or unannotated_views) and schema.arguments:
            aliases.add((0, schema.arguments[0].name))
    return _OpInfo(frozenset(writes), frozenset(aliases), random, True)


def _packet_overloads(name: str) -> list[Any] | None:
    packet = getattr(aten, name, None)
    if not isinstance(packet, torch._ops.OpOverloadPacket):
        return None
    return [getattr(packet, o) for o in packet.overloads()]


_INFO_CACHE: dict[Any, _OpInfo] = {}
_REGISTERED_PURE: set[Any] = set()


def register_pure(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Declare that ``fn`` (one of fxfuse's own graph functions) returns fresh memory, writes
    nothing and draws no random numbers. Usable as a decorator."""
    _REGISTERED_PURE.add(fn)
    _INFO_CACHE.pop(fn, None)
    return fn


def _function_info(fn: Any) -> _OpInfo:
    """What ``fn`` (an aten op, a ``torch``/``F`` function, an operator) may do, by its schema."""
    try:
        cached = _INFO_CACHE.get(fn)
    except TypeError:  # unhashable callable
        cached = None
    if cached is not None:
        return cached
    info = _resolve_function(fn)
    with contextlib.suppress(TypeError):
        _INFO_CACHE[fn] = info
    return info


def _resolve_function(fn: Any) -> _OpInfo:
    if isinstance(fn, torch._ops.OpOverload):
        return _schema_info([fn])
    if isinstance(fn, torch._ops.OpOverloadPacket):
        return _schema_info([getattr(fn, o) for o in fn.overloads()])
    if fn in _REGISTERED_PURE or getattr(fn, "__module__", None) == "fxfuse.kernels":
        return _PURE  # (fxfuse.kernels holds pure functions only: its docstring says so)
    if fn in _IN_PLACE_OPERATORS:
        return _OpInfo(_FIRST, _FIRST, False, True)
    if fn in _PURE_OPERATORS:
        return _PURE
    module = getattr(fn, "__module__", None) or ""
    name = getattr(fn, "__name__", "")
    from_torch = module.startswith("torch") or isinstance(fn, type(torch.conv2d))
    if not from_torch or not name:
        return _UNKNOWN
    overloads = _packet_overloads(name)
    if overloads is not None:
        return _schema_info(overloads)
    if name.endswith("_") and not name.endswith("__"):
        return _OpInfo(_FIRST, _FIRST, None, True)
    # a Python function of torch's own (torch.nn.functional...): documented not to write its
    # inputs unless asked (inplace=True, out=); what it returns and whether it is random is
    # unknown
    return _OpInfo(frozenset(), None, None, True)


def _method_info(name: str) -> _OpInfo:
    cached = _INFO_CACHE.get(("method", name))
    if cached is not None:
        return cached
    overloads = _packet_overloads(name)
    if overloads is not None:
        info = _schema_info(overloads)
    elif name.endswith("_") and not name.endswith("__"):
        info = _OpInfo(_FIRST, _FIRST, None, True)
    elif name in _METADATA_METHODS or name in ("item", "tolist", "__len__"):
        info = _PURE
    else:
        info = _OpInfo(frozenset(), None, None, True)  # a Tensor method: documented
    _INFO_CACHE[("method", name)] = info
    return info


def _positions(arguments: frozenset[Argument] | None, node: Node) -> tuple[Node, ...] | None:
    """The input nodes that schema ``arguments`` are bound to in ``node`` (by position, else by
    name); ``None`` when unknown (the caller then assumes every tensor input)."""
    if arguments is None:
        return None
    found: list[Node] = []
    for index, name in arguments:
        value = node.args[index] if 0 <= index < len(node.args) else node.kwargs.get(name)
        if isinstance(value, Node):
            found.append(value)
        elif isinstance(value, (tuple, list)):  # e.g. a list of tensors (cat, foreach ops)
            found += [v for v in value if isinstance(v, Node)]
    return tuple(dict.fromkeys(found))


# --------------------------------------------------------------------------------------------
# The graph's effects
# --------------------------------------------------------------------------------------------


class Effects:
    """Effects of every node of ``graph``, and the storage classes they act on.

    ``module`` resolves ``call_module`` targets; ``tensor`` resolves the value of a node that
    holds a constant tensor (a ``get_attr``, a weight dynamo lifted to an input), or ``None``.
    Nodes added to the graph later are looked at when first asked about; a rewrite that adds a
    node writing something must call :meth:`added` so later checks see the write.
    """

    def __init__(
        self,
        graph: Graph,
        module: Callable[[str], nn.Module],
        tensor: Callable[[Node], Tensor | None],
    ):
        self.graph = graph
        self._module = module
        self._tensor = tensor
        self._parent: dict[Any, Any] = {}
        self._members: dict[Any, list[Any]] = {}  # class root -> every key in the class
        self._writers: dict[Any, list[Node]] = {}  # storage class root -> nodes writing it
        self._written_tensors: set[int] = set()  # storages written by code fxfuse cannot see
        self._done: set[Node] = set()
        for node in graph.nodes:
            self._visit(node)

    # -- facts about one node ------------------------------------------------------------------

    def writes(self, node: Node) -> tuple[Node, ...]:
        """The input nodes whose values ``node`` may change in place."""
        self._visit(node)
        return self._compute_writes(node)

    def aliases(self, node: Node) -> tuple[Node, ...]:
        """The input nodes whose storage ``node``'s result may share."""
        if node.op in ("placeholder", "get_attr", "output"):
            return ()
        if node.op == "call_function" and node.target is getattr and len(node.args) == 2:
            return (node.args[0],) if node.args[1] in _ALIASING_ATTRIBUTES else ()
        if node.op == "call_function" and node.target is operator.getitem:
            source = node.args[0]
            return (source,) if isinstance(source, Node) else ()
        if node.op == "call_module":
            module = self._module(str(node.target))
            if isinstance(module, torch.fx.GraphModule) and _known_module(module):
                return _positions(_graph_module_info(module).aliases, node) or ()
            return _tensor_inputs(node) if aliasing_module(module) else ()
        info = self._info(node)
        if info is None:
            return _tensor_inputs(node)
        positions = _positions(info.aliases, node)
        return _tensor_inputs(node) if positions is None else positions

    def random(self, node: Node) -> bool:
        """Whether running ``node`` may draw random numbers (``None`` tags count as yes)."""
        if node.op == "call_module":
            module = self._module(str(node.target))
            if isinstance(module, torch.fx.GraphModule) and _known_module(module):
                return bool(_graph_module_info(module).random)
            return (isinstance(module, _RANDOM_MODULES) and module.training) or not _known_module(
                module
            )
        if node.op not in ("call_function", "call_method"):
            return False
        info = self._info(node)
        return info is None or info.random is not False

    def opaque(self, node: Node) -> bool:
        """Whether ``node`` runs code fxfuse knows nothing about (which may do anything)."""
        if node.op == "call_module":
            return not _known_module(self._module(str(node.target)))
        if node.op in ("call_function", "call_method"):
            info = self._info(node)
            return info is None or not info.known
        return False

    def pure(self, node: Node) -> bool:
        """Whether erasing ``node`` when nothing uses it changes nothing else: it writes
        nothing anyone can see, draws no random numbers and runs no unknown code."""
        if node.op in ("placeholder", "output"):
            return False
        if node.op == "get_attr":
            return True
        if self.random(node) or self.opaque(node):
            return False
        # a write nobody can see (``x += y`` on the graph's own value, read by nobody after)
        # is no effect: such an op is a sum computed in place
        return all(self.private(target, node) for target in self.writes(node))

    # -- storage ---------------------------------------------------------------------------------

    def storage(self, node: Node) -> Any:
        """The storage class of ``node``'s value (equal for values that may share memory)."""
        self._visit(node)
        return self._find(node)

    def written(self, node: Node) -> bool:
        """Whether the memory ``node``'s value lives in may be changed by the graph (a write
        through any alias) or by code fxfuse cannot see into (an opaque module's own state).
        A value that may change is never a constant."""
        self._visit(node)
        if self._writers.get(self._find(node)):
            return True
        t = self._tensor(node)
        return t is not None and _storage_key(t) in self._written_tensors

    def writers_of(self, node: Node) -> list[Node]:
        """The nodes that may write ``node``'s memory (through any alias)."""
        self._visit(node)
        return [
            w for w in self._writers.get(self._find(node), []) if not getattr(w, "_erased", False)
        ]

    def written_tensor(self, tensor: Tensor) -> bool:
        """Whether the graph (through any node reading it) or code it cannot see may change
        ``tensor`` — a module's own parameter, which no node of the graph names."""
        key = _storage_key(tensor)
        if key in self._written_tensors:
            return True
        root = self._parent.get(("memory", key))
        return root is not None and bool(self._writers.get(self._find(("memory", key))))

    def first_write_between(
        self, after: Node, before: Node, values: Iterable[Node], ignore: Iterable[Node] = ()
    ) -> Node | None:
        """The first node strictly between ``after`` and ``before`` (graph order), other than
        those in ``ignore``, that may write the memory of one of ``values``, or ``None``."""
        found: Node | None = None
        skip = set(ignore)
        for value in values:
            for writer in self._writers.get(self.storage(value), ()):
                if getattr(writer, "_erased", False) or writer in skip:
                    continue
                if after < writer < before and (found is None or writer < found):
                    found = writer
        return found

    def private(self, node: Node, reader: Node) -> bool:
        """Whether ``reader`` writing ``node``'s memory in place is unobservable, so that
        ``x += y`` may be computed as ``x + y``: the memory is the graph's own (no input,
        attribute or opaque state shares it) and nothing made before ``reader`` that shares
        it is read after ``reader`` (values made after it derive from its result)."""
        self._visit(node)
        for member in self._members.get(self._find(node), (self._find(node),)):
            if not isinstance(member, Node):
                return False  # a graph input's or an attribute's memory: the caller's
            if member is reader or getattr(member, "_erased", False):
                continue
            if member.op in ("placeholder", "get_attr", "output"):
                return False
            if member < reader and any(u is not reader and reader < u for u in member.users):
                return False  # read again after the write, where it must see the update
        return True

    def unread_writes(self, node: Node, dying: Collection[Node] = ()) -> list[Node] | None:
        """The writes into ``node``'s memory, and the views they write through, when nothing
        but ``dying`` reads that memory: once ``node`` and ``dying`` are gone they are dead
        (a border written after a pad, ``out[:, :, 0:p] = v``, as ``setitem`` or as export's
        ``copy_(aten.slice(out, …), v)``, whose reader a rule folded away). In graph order.

        ``None`` where that memory is not ``node``'s own (it views an input, an attribute or
        another value), a view of it or a write's result is read by anything else, or a
        member of its storage class is neither a pure view nor a known write. Metadata reads
        of ``node`` itself (which a replacement can answer) do not count as reads."""
        self._visit(node)
        root = self._find(node)
        members = self._members.get(root, [root])
        live = [m for m in members if not (isinstance(m, Node) and getattr(m, "_erased", False))]
        if not all(isinstance(m, Node) for m in live):
            return None  # a graph input's or an attribute's memory: the caller's
        inside = set(live) | set(dying)
        found: list[Node] = []
        for member in live:
            readers = [u for u in member.users if u not in inside]
            if member is node:
                if any(not reads_metadata_only(u, node) for u in readers):
                    return None
                continue
            if readers or member.op not in ("call_function", "call_method"):
                return None
            if self.random(member) or self.opaque(member) or not self.aliases(member):
                return None  # (not aliasing: another maker of this memory, which stays)
            if any(self._find(t) != root for t in self.writes(member)):
                return None
            found.append(member)
        return sorted(found)

    def added(self, nodes: Iterable[Node]) -> None:
        """Take nodes a rewrite inserted into account (their writes and aliases)."""
        for node in nodes:
            self._visit(node)

    # -- internals -------------------------------------------------------------------------------

    def _info(self, node: Node) -> _OpInfo | None:
        if node.op == "call_function":
            return _function_info(node.target)
        if node.op == "call_method":
            return _method_info(str(node.target))
        return None

    def _visit(self, node: Node) -> None:
        if node in self._done:
            return
        self._done.add(node)
        self._parent.setdefault(node, node)
        key = self._root_key(node)
        if key is not None:
            self._union(node, key)
        for source in self.aliases(node):
            self._visit(source)
            self._union(node, source)
        written = self._compute_writes(node)
        if written:
            for target in written:
                self._visit(target)
                self._writers.setdefault(self._find(target), []).append(node)
        if node.op == "call_module":
            self._note_module_state(node)

    def _root_key(self, node: Node) -> Any:
        """Values that start a storage class: graph inputs and attributes, by their tensor's
        memory where fxfuse knows it (tied weights are one class), else one class for all the
        graph's activation inputs (the caller may pass one tensor twice)."""
        if node.op not in ("placeholder", "get_attr"):
            return None
        t = self._tensor(node)
        if t is not None:
            return ("memory", _storage_key(t))
        return ("inputs",) if node.op == "placeholder" else ("attribute", str(node.target))

    def _compute_writes(self, node: Node) -> tuple[Node, ...]:
        if node.op not in ("call_function", "call_method", "call_module"):
            return ()
        targets: list[Node] = []
        out = node.kwargs.get("out")
        if isinstance(out, Node):
            targets.append(out)
        elif isinstance(out, (tuple, list)):
            targets += [o for o in out if isinstance(o, Node)]
        first = node.args[0] if node.args and isinstance(node.args[0], Node) else None
        if node.kwargs.get("inplace") is True and first is not None:
            targets.append(first)
        if node.op == "call_module":
            module = self._module(str(node.target))
            if not _known_module(module):
                targets += _tensor_inputs(node)
            elif isinstance(module, torch.fx.GraphModule):
                targets += _positions(_graph_module_info(module).writes, node) or ()
            elif getattr(module, "inplace", False) is True and first is not None:
                targets.append(first)
            return tuple(dict.fromkeys(targets))
        info = self._info(node)
        assert info is not None
        positions = _positions(info.writes, node)
        targets += _tensor_inputs(node) if positions is None or not info.known else positions
        return tuple(dict.fromkeys(targets))

    def _note_module_state(self, node: Node) -> None:
        """A module call that may change its own tensors (opaque code, a batch norm updating
        running statistics in training mode, forward hooks): those tensors are not constants."""
        module = self._module(str(node.target))
        changes_own_state = (
            not _known_module(module)
            or (isinstance(module, _BatchNorm) and module.training)
            or _has_hooks(module)
        )
        if changes_own_state:
            for t in (*module.parameters(), *module.buffers()):
                self._written_tensors.add(_storage_key(t))

    def replaced(self, old: Node, new: Node) -> None:
        """``new`` takes ``old``'s place (its users now read ``new``): a write those users
        made to ``old`` is now a write to ``new``, so they count as one storage class."""
        self._visit(new)
        self._union(old, new)

    def _find(self, key: Any) -> Any:
        parent = self._parent.setdefault(key, key)
        while parent != key:
            grand = self._parent.setdefault(parent, parent)
            self._parent[key] = grand
            key, parent = parent, grand
        return key

    def _union(self, a: Any, b: Any) -> None:
        ra, rb = self._find(a), self._find(b)
        if ra == rb:
            return
        small, large = self._members.get(ra, [ra]), self._members.get(rb, [rb])
        if len(small) > len(large):
            ra, rb, small, large = rb, ra, large, small
        self._parent[ra] = rb  # the smaller class joins the larger
        self._members[rb] = large + small
        self._members.pop(ra, None)
        moved = self._writers.pop(ra, None)
        if moved:
            self._writers.setdefault(rb, []).extend(moved)


def _storage_key(t: Tensor) -> int:
    try:
        return t.untyped_storage().data_ptr() or id(t)
    except (RuntimeError, NotImplementedError):  # meta, fake or sparse tensors
        return id(t)


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _known_module(module: nn.Module) -> bool:
    """A module of PyTorch's own (``torch.nn``, or torch internals such as the guard function
    ``torch.export`` adds) running ``forward`` as PyTorch defines it, without hooks, or a
    ``GraphModule`` whose graph fxfuse can read: fxfuse knows what it does. Anything else (a
    leaf module of the user's, a hooked module) is opaque."""
    if _has_hooks(module):
        return False
    if isinstance(module, torch.fx.GraphModule):
        return _graph_module_info(module).known
    own = vars(module).get("forward")
    if own is not None and not _torchs_own(own, module):
        return False  # (replaced on the instance: the user's code)
    forward = getattr(type(module), "forward", None)
    return (getattr(forward, "__module__", None) or "").startswith("torch.")


_GRAPH_MODULE_INFO: dict[int, tuple[Any, _OpInfo]] = {}


def _graph_module_info(gm: torch.fx.GraphModule) -> _OpInfo:
    """What calling ``gm`` may do, read from its graph: which inputs it writes and which its
    output may alias (by position), and whether it runs random or unknown code."""
    cached = _GRAPH_MODULE_INFO.get(id(gm))
    if cached is not None and cached[0] is gm.graph:
        return cached[1]
    _GRAPH_MODULE_INFO[id(gm)] = (gm.graph, _UNKNOWN)  # (a graph that calls itself)
    inner = Effects(gm.graph, gm.get_submodule, lambda n: None)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    output = next((n for n in gm.graph.nodes if n.op == "output"), None)
    returned = {inner.storage(n) for n in (output.all_input_nodes if output else ())}
    writes = frozenset(
        (i, p.name) for i, p in enumerate(placeholders) if inner._writers.get(inner.storage(p))
    )
    aliases = frozenset(
        (i, p.name) for i, p in enumerate(placeholders) if inner.storage(p) in returned
    )
    known = not any(inner.opaque(n) for n in gm.graph.nodes)
    random = any(inner.random(n) for n in gm.graph.nodes)
    info = _OpInfo(writes, aliases, random, known)
    _GRAPH_MODULE_INFO[id(gm)] = (gm.graph, info)
    return info


def _torchs_own(fn: Any, module: nn.Module) -> bool:
    """Whether ``fn``, set on ``module`` itself, is torch's (the wrapper ``torch.export`` puts
    on its guard module's ``forward``), not the user's nor another module's method."""
    if getattr(fn, "__self__", module) is not module:
        return False
    return (getattr(fn, "__module__", None) or "").startswith("torch.")


def aliasing_module(module: nn.Module) -> bool:
    """Whether ``module``'s forward may return its input or a view of it."""
    return isinstance(module, _ALIASING_MODULES) or not _known_module(module)


# --------------------------------------------------------------------------------------------
# Running code on constants, watching what it does
# --------------------------------------------------------------------------------------------


class ImpureCall(Exception):
    """Code run by :func:`run_pure` drew random numbers or tried to write one of its inputs."""


class _Watch(torch.utils._python_dispatch.TorchDispatchMode):
    """Refuses, before it runs, any aten op that is random or writes memory of ``guarded``."""

    def __init__(self, guarded: set[int]):
        super().__init__()
        self.guarded = guarded

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if torch.Tag.nondeterministic_seeded in getattr(func, "tags", ()):
            raise ImpureCall(f"{func} draws random numbers")
        schema = getattr(func, "_schema", None)
        if schema is not None:
            values = dict(zip((a.name for a in schema.arguments), args, strict=False))
            values.update(kwargs)
            for arg in schema.arguments:
                info = arg.alias_info
                value = values.get(arg.name)
                if info is None or not info.is_write or not isinstance(value, Tensor):
                    continue
                if _storage_key(value) in self.guarded:
                    raise ImpureCall(f"{func} writes its input {arg.name}")
        return func(*args, **kwargs)


def run_pure(fn: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    """``fn(*args, **kwargs)``, refused (:class:`ImpureCall`) if it draws random numbers or
    would change one of the tensors it is given: whether an op is pure is asked of the aten
    operators it really runs (their tags and schemas), not guessed from its name."""
    tensors: list[Tensor] = []
    torch.utils._pytree.tree_map(
        lambda v: tensors.append(v) if isinstance(v, Tensor) else None, (list(args), kwargs)
    )
    with torch.no_grad(), _Watch({_storage_key(t) for t in tensors}):
        return fn(*args, **kwargs)
