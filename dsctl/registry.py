"""Model registry: ``@register_model`` on builders, ``build_model(name, **kwargs)``, ``list_models()``."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from dsctl.errors import DsctlError

if TYPE_CHECKING:
    from dsctl.models.base import Supernet

__all__ = ["register_model", "build_model", "list_models", "model_kwargs_allowed", "describe_models"]

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


def describe_models() -> list[dict[str, Any]]:
    """What ``dsctl models`` lists: each registered model with its default options (sub-networks, slimming
    ratios, routed stages, gate position, input, parameters in millions, the search space)."""
    rows = []
    for name in list_models():
        m = build_model(name)
        rows.append({
            "model": name, "subnets": m.space.num_subnets, "ratios": list(m.space.ratios()),
            "routed_stages": list(m.space.routed_stages), "gate_after": m.space.gate_after,
            "input_size": m.default_input_size, "in_chans": m.in_chans, "num_classes": m.num_classes,
            "params_m": round(sum(p.numel() for p in m.parameters()) / 1e6, 3), "space": m.space.to_dict(),
        })
    return rows
