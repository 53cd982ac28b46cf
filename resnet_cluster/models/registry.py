"""Model registry: names in ``model.arch`` map to builder functions.

A builder is a plain function ``fn(**options) -> nn.Module``; its keyword arguments are the
``model.*`` options it accepts (``shortcut``, ``block``, ``zero_init_residual``, ...). The
registry refuses duplicate names, and turns an unknown name or an option the builder does not
take into a :class:`~resnet_cluster.errors.ConfigError` whose message names the field.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from torch import nn

from resnet_cluster import datasets
from resnet_cluster.errors import ConfigError

Builder = Callable[..., nn.Module]


@dataclass(frozen=True)
class ModelInfo:
    """What ``models list`` shows about one registered name."""

    name: str
    dataset: str  # "cifar10" or "imagenet": the input size and class count it is built for
    depth: int  # weighted layers as the paper counts them (6n+2 on CIFAR)
    family: str  # "resnet", "plain", "preact"
    block: str = "basic"  # "basic" (two 3x3) or "bottleneck" (1x1, 3x3, 1x1)

    @property
    def input_size(self) -> int:
        """Side of the native square input: 32 on CIFAR, 224 on ImageNet (Section 3.4)."""
        return datasets.get(self.dataset).input_size


_BUILDERS: dict[str, Builder] = {}
_INFO: dict[str, ModelInfo] = {}


def register(
    name: str, *, dataset: str, depth: int, family: str, block: str = "basic"
) -> Callable[[Builder], Builder]:
    """Decorator: register ``fn`` under ``name``. Registering a name twice raises ValueError."""

    def decorator(fn: Builder) -> Builder:
        if name in _BUILDERS:
            raise ValueError(f"model {name!r} is already registered")
        _BUILDERS[name] = fn
        _INFO[name] = ModelInfo(
            name=name, dataset=dataset, depth=depth, family=family, block=block
        )
        return fn

    return decorator


def available() -> list[ModelInfo]:
    """All registered models, sorted by dataset, family, then depth (then name)."""
    return sorted(_INFO.values(), key=lambda i: (i.dataset, i.family, i.depth, i.name))


def info(name: str) -> ModelInfo:
    """The :class:`ModelInfo` of ``name``; ConfigError if it is not registered."""
    if name not in _INFO:
        names = ", ".join(i.name for i in available())
        raise ConfigError(f"unknown model {name!r}: model.arch must be one of {names}.")
    return _INFO[name]


def build(name: str, **options: object) -> nn.Module:
    """Build the model registered as ``name`` with the given ``model.*`` options.

    Raises ConfigError for an unknown name, an option the builder does not accept, or a bad
    option value (the builders validate values with :func:`check_choice`).
    """
    if name not in _BUILDERS:
        names = ", ".join(i.name for i in available())
        raise ConfigError(f"unknown model {name!r}: model.arch must be one of {names}.")
    fn = _BUILDERS[name]
    params = inspect.signature(fn).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    if not takes_any:
        accepted = [
            p.name
            for p in params.values()
            if p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        ]
        unknown = sorted(set(options) - set(accepted))
        if unknown:
            bad = ", ".join(f"model.{k}" for k in unknown)
            ok = ", ".join(f"model.{k}" for k in accepted) or "none"
            raise ConfigError(
                f"model {name!r} does not accept the option(s) {bad}; the options it accepts "
                f"are: {ok}."
            )
    return fn(**options)


def check_choice(field: str, value: object, allowed: Iterable[object]) -> None:
    """Raise ConfigError unless ``value`` is one of ``allowed``; ``field`` is e.g. 'model.block'."""
    allowed = tuple(allowed)
    if value not in allowed:
        ok = ", ".join(repr(a) for a in allowed)
        raise ConfigError(f"{field} is {value!r}, which is not allowed: it must be one of {ok}.")
