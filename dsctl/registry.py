"""Model registry: ``@register_model`` on builders, ``build_model(name, **kwargs)``, ``list_models()``."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from dsctl.errors import DsctlError

if TYPE_CHECKING:
    from dsctl.models.base import Supernet

__all__ = ["register_model", "build_model", "list_models", "model_kwargs_allowed"]

_REGISTRY: dict[str, Callable[..., Supernet]] = {}


def register_model(fn: Callable[..., Supernet]) -> Callable[..., Supernet]:
    """Register a supernet builder under its function name; a duplicate name raises.

    The registered builder stamps every model it builds with ``model_name`` (the builder's name) and
    ``model_kwargs`` (the arguments it was called with), whether it is called through :func:`build_model`
    or directly, so that a checkpoint can rebuild the same model.
    """
    name = fn.__name__
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is already registered")
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def builder(*args: Any, **kwargs: Any) -> Supernet:
        bound = signature.bind(*args, **kwargs)
        model = fn(*args, **kwargs)
        model.model_name = name
        model.model_kwargs = dict(bound.arguments)
        return model

    _REGISTRY[name] = builder
    return builder


def _ensure_loaded() -> None:
    import dsctl.models  # noqa: F401  (registers the families)


def list_models() -> list[str]:
    _ensure_loaded()
    return sorted(_REGISTRY)


def model_kwargs_allowed(name: str) -> list[str]:
    _ensure_loaded()
    return [p for p in inspect.signature(_REGISTRY[name]).parameters]


def build_model(name: str, **kwargs: Any) -> Supernet:
    """Build a registered supernet.

    Raises:
        DsctlError: unknown model name (lists the known ones) or unknown builder option.

    Example:
        >>> m = build_model("tiny_ds_resnet", num_classes=10)
        >>> y = m(torch.randn(2, 3, 32, 32), m.space.smallest())
    """
    _ensure_loaded()
    if name not in _REGISTRY:
        raise DsctlError(f"unknown model {name!r} (known models: {', '.join(sorted(_REGISTRY))})")
    allowed = model_kwargs_allowed(name)
    bad = sorted(set(kwargs) - set(allowed))
    if bad:
        raise DsctlError(f"model {name!r} has no option {', '.join(bad)} (allowed: {', '.join(allowed)})")
    return _REGISTRY[name](**kwargs)
