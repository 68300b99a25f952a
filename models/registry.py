"""One registry of model builders: ``create(name, **overrides)`` and ``names()``."""
from __future__ import annotations

from typing import Callable

import torch.nn as nn

_BUILDERS: dict[str, Callable[..., nn.Module]] = {}


def register_model(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register ``builder`` under its function name; a second builder of that name fails."""
    name = builder.__name__
    if name in _BUILDERS:
        raise ValueError(f"model {name!r} is registered twice")
    _BUILDERS[name] = builder
    return builder


def create(name: str, **overrides) -> nn.Module:
    """Build the registered model ``name``; ``overrides`` replace fields of its config."""
    try:
        builder = _BUILDERS[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; registered: {', '.join(names())}") from None
    return builder(**overrides)


def names() -> list[str]:
    return sorted(_BUILDERS)
