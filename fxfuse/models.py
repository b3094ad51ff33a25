"""Model specs: the one-word names the command line and the benchmarks give models.

=========================  ==============================================================
``builtin:NAME``           a network from :mod:`fxfuse.zoo` (``training_time_net``, …)
``torchvision:NAME``       ``torchvision.models.get_model(NAME, weights=None)``
``timm:NAME``              ``timm.create_model(NAME, pretrained=False)``
``path/to/file.py:FN``     ``FN()`` from that file (a function or an ``nn.Module`` class)
``package.module:FN``      ``FN()`` from an importable module
``…:FN(key=value, …)``     ``FN`` called with those arguments (Python literals only), e.g.
                           ``repvgg.py:create_RepVGG_A0(deploy=True)``
=========================  ==============================================================

Library models are always built with **random weights**: nothing is downloaded (backbone
weights of segmentation and detection models included). Their batch norms get random
statistics before any comparison, since default statistics hide a wrong fold.
"""

from __future__ import annotations

import ast
import difflib
import importlib
import importlib.util
import inspect
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from fxfuse import zoo
from fxfuse.errors import FxFuseError

__all__ = ["BUILTINS", "LoadedModel", "SpecError", "load_model"]

BUILTINS: dict[str, Callable[[], nn.Module]] = {
    "training_time_net": zoo.training_time_net,
    "repvgg_net": zoo.repvgg_net,
}


class SpecError(FxFuseError, ValueError):
    """A model spec that names nothing loadable. ``hint`` says what to do instead."""

    def __init__(self, message: str, hint: str = ""):
        super().__init__(message)
        self.hint = hint


@dataclass
class LoadedModel:
    """A model a spec named, in eval mode, and what the caller should know about it.

    ``random_weights`` is true for library models built here without their trained weights
    (their batch norms may be randomized freely); false for a user's factory, whose weights
    are the user's and must be left as they are. ``was_training``: the factory returned the
    model in training mode and :func:`load_model` switched it to eval mode.
    """

    spec: str
    model: nn.Module
    input_shape: tuple[int, ...]
    random_weights: bool
    was_training: bool = False


def _suggest(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=4, cutoff=0.5)
    return f"did you mean {', '.join(close)}?" if close else ""


def _builtin(name: str) -> LoadedModel:
    if name not in BUILTINS:
        raise SpecError(
            f"no built-in model {name!r}", f"built-in models are: {', '.join(BUILTINS)}"
        )
    return LoadedModel(f"builtin:{name}", BUILTINS[name](), (1, 3, 64, 64), True)


def _import(package: str, extra: str) -> Any:
    try:
        return importlib.import_module(package)
    except ImportError as error:
        raise SpecError(f"{package} is not installed ({error})", f"pip install {extra}") from error


def _torchvision(name: str) -> LoadedModel:
    models = _import("torchvision.models", "torchvision")
    available = models.list_models()
    if name not in available:
        raise SpecError(
            f"torchvision has no model {name!r}",
            _suggest(name, available) or "torchvision.models.list_models() lists them",
        )
    builder = models.get_model_builder(name)
    kwargs: dict[str, Any] = {"weights": None}
    if "weights_backbone" in inspect.signature(builder).parameters:
        kwargs["weights_backbone"] = None  # never download a backbone either
    if name in ("inception_v3", "googlenet"):
        kwargs["init_weights"] = False  # scipy-based init: slow, and random weights suffice
    return LoadedModel(f"torchvision:{name}", builder(**kwargs), (1, 3, 224, 224), True)


def _timm(name: str) -> LoadedModel:
    timm = _import("timm", "timm")
    if not timm.is_model(name):
        raise SpecError(
            f"timm has no model {name!r}",
            _suggest(name, timm.list_models()) or "timm.list_models('pattern*') lists them",
        )
    model = timm.create_model(name, pretrained=False)
    size = tuple((getattr(model, "pretrained_cfg", None) or {}).get("input_size", (3, 224, 224)))
    return LoadedModel(f"timm:{name}", model, (1, *size), True)


def _factory_module(where: str) -> Any:
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise SpecError(f"no such file: {where}", "give a path to a .py file, then :factory")
        module_name = f"fxfuse_user_{abs(hash(str(path.resolve())))}"
        spec = importlib.util.spec_from_file_location(module_name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # dataclasses and pickling look modules up here
        spec.loader.exec_module(module)
        return module
    try:
        return importlib.import_module(where)
    except ImportError as error:
        raise SpecError(
            f"cannot import {where!r}: {error}",
            "use builtin:NAME, torchvision:NAME, timm:NAME, path/to/file.py:factory "
            "or package.module:factory",
        ) from error


def _defined_in(module: Any) -> list[str]:
    """The functions and classes a module defines itself (not the ones it imports)."""
    return [
        name
        for name, value in vars(module).items()
        if not name.startswith("_")
        and (inspect.isfunction(value) or inspect.isclass(value))
        and getattr(value, "__module__", None) == module.__name__
    ]


def _call_arguments(text: str, spec: str) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``(1, deploy=True)`` as positional and keyword arguments; Python literals only."""
    try:
        call = ast.parse(f"f{text}", mode="eval").body
        assert isinstance(call, ast.Call)
        args = tuple(ast.literal_eval(a) for a in call.args)
        kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg is not None}
        if len(kwargs) != len(call.keywords):
            raise ValueError("**kwargs")
    except (SyntaxError, ValueError, AssertionError) as error:
        raise SpecError(
            f"cannot read the arguments in {spec!r}",
            "write them as Python literals, e.g. file.py:make(deploy=True, width=0.5)",
        ) from error
    return args, kwargs


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def _factory(where: str, name: str, call: str, spec: str) -> LoadedModel:
    module = _factory_module(where)
    factory = getattr(module, name, None)
    if not callable(factory):
        defined = _defined_in(module)
        hint = _suggest(name, defined) or (
            f"{where} defines {', '.join(defined)}" if defined else f"{where} defines nothing"
        )
        raise SpecError(f"{where} has no function {name!r}", hint)
    args, kwargs = _call_arguments(call, spec) if call else ((), {})
    model = factory(*args, **kwargs)
    if not isinstance(model, nn.Module):
        kind = type(model).__name__
        raise SpecError(
            f"{spec} returned {_article(kind)} {kind}, not an nn.Module",
            "the factory must return the model itself",
        )
    shape = tuple(getattr(model, "example_input_shape", (1, 3, 224, 224)))
    return LoadedModel(spec, model, shape, False)


# where:name or where:name(arguments); ``where`` is the shortest prefix that leaves a name
_SPEC = re.compile(r"(?P<where>.+?):(?P<name>[A-Za-z_]\w*)(?P<call>\(.*\))?", re.S)


def load_model(spec: str) -> LoadedModel:
    """Build the model ``spec`` names, in eval mode (see the module docstring for specs).

    Raises:
        SpecError: the spec names no model, or the library it needs is not installed.
    """
    parsed = _SPEC.fullmatch(spec.strip())
    if parsed is None:
        raise SpecError(
            f"cannot read model spec {spec!r}",
            "use builtin:NAME, torchvision:NAME, timm:NAME or path/to/file.py:factory",
        )
    where, name, call = parsed["where"], parsed["name"], parsed["call"] or ""
    loaders = {"builtin": _builtin, "torchvision": _torchvision, "timm": _timm}
    if where in loaders and call:
        raise SpecError(f"{where} models take no arguments here: {spec!r}", f"use {where}:{name}")
    loaded = loaders[where](name) if where in loaders else _factory(where, name, call, spec)
    loaded.was_training = loaded.model.training and not loaded.random_weights
    loaded.model.eval()
    return loaded
