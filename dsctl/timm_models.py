"""dsctl's families in timm's model registry: ``timm.create_model("ds_resnet50")`` builds the supernet.

Importing dsctl registers them: at once when timm is imported already, else as soon as timm is (an
import hook that waits for it, so ``import dsctl`` does not pay timm's import time). dsctl's own registry
and names do not change; a name timm already has is left to timm.

``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=PATH))`` loads ``PATH`` as
``--init-from`` does (a timm/torchvision state dict at full width, a Hub folder, a dsctl run); dsctl hosts
no weights, so ``pretrained=True`` without a file is an error. Other keyword arguments go to dsctl's builder
(``num_classes``, ``in_chans``, ``gate_after``, ...).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from typing import Any

__all__ = ["register_with_timm", "install_hook"]

_registered: list[str] = []


def _entrypoint(name: str):
    def create(pretrained: bool = False, pretrained_cfg: Any = None, pretrained_cfg_overlay: dict | None = None,
               **kwargs: Any):
        from dsctl.errors import DsctlError
        from dsctl.registry import build_model

        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        model = build_model(name, **kwargs)
        if pretrained:
            overlay = dict(pretrained_cfg_overlay or {})
            if isinstance(pretrained_cfg, dict):
                overlay = {**pretrained_cfg, **overlay}
            file = overlay.get("file")
            if not file:
                raise DsctlError(f"{name}: dsctl hosts no pretrained weights; pass pretrained_cfg_overlay="
                                 "dict(file=PATH) (a full-width state dict, Hub folder or dsctl run)")
            from dsctl.weights import load_full_width

            load_full_width(model, file)
        return model

    create.__name__ = create.__qualname__ = name
    create.__module__ = __name__
    create.__doc__ = f"dsctl's {name} supernet (see ``dsctl models``)."
    return create


def register_with_timm() -> list[str]:
    """Register every dsctl family timm does not already name; returns the names registered (once)."""
    if _registered:
        return list(_registered)
    from timm.models import is_model, register_model

    from dsctl.registry import list_models

    for name in list_models():
        if is_model(name):
            continue
        fn = _entrypoint(name)
        globals()[name] = fn
        register_model(fn)
        _registered.append(name)
    return list(_registered)


class _OnTimmImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: when ``timm`` is about to be imported, wraps its loader so that dsctl's
    families are registered right after timm's own."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "timm":
            return None
        sys.meta_path.remove(self)  # once; and the lookup below must not find this finder again
        spec = importlib.util.find_spec("timm")
        if spec is None or spec.loader is None:
            return None
        loader, run = spec.loader, spec.loader.exec_module

        def exec_module(module) -> None:
            run(module)
            try:
                register_with_timm()
            except Exception as err:  # never break `import timm` for a user: say so and go on
                import warnings

                warnings.warn(f"dsctl could not register its models with timm ({type(err).__name__}: {err})",
                              stacklevel=2)

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def install_hook() -> None:
    """Register now if timm is imported, else when it is."""
    if "timm" in sys.modules:
        register_with_timm()
    elif not any(isinstance(f, _OnTimmImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _OnTimmImport())
