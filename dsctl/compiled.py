"""Compiled deployment: ``torch.compile`` for timing, AOTInductor packages for shipping.

Eager PyTorch pays a per-operator cost that small networks feel (on 2 CPU threads, tiny exported
sub-networks ran 1.3-1.7x faster compiled). Compiling is a deployment choice, so dsctl offers it for
whatever it deploys and times both ways, never one side compiled and the other eager:

* :func:`compile_module`: ``torch.compile`` of a static network, with a dynamic batch dimension; a routed
  model (:class:`~dsctl.layers.static.RoutedNet`) compiles its front and each tail, and its grouping
  stays eager (each route's batch size depends on the data).
* :func:`package_program` / :func:`load_package`: an AOTInductor package (``.pt2``, a compiled shared
  library inside) of a ``torch.export`` program, loaded with ``torch._inductor.aoti_load_package`` alone:
  no dsctl and no Python model code at inference. ``dsctl export --format aoti`` writes them.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from dsctl.errors import DsctlError

__all__ = ["compile_module", "package_program", "load_package"]


_COMPILED = 0  # networks compile_module has wrapped in this process (see _allow_recompiles)
_GRAPHS_PER_NETWORK = 4  # batch 1 and batch N specialise apart; a routed tail also meets groups of one


def compile_module(module: nn.Module, backend: str = "inductor") -> nn.Module:
    """``module`` under ``torch.compile`` (dynamic batch dimension), compiled on its first call.

    A :class:`~dsctl.layers.static.RoutedNet` is rebuilt with its front and every tail compiled and the
    same grouping code, so its outputs, routes and glue are those of the eager model.

    Every network compiled this way stays compiled: Dynamo keys its cache on the code it compiles, and
    all ``nn.Sequential`` networks share one ``forward``, so by default the ninth network of a report
    silently ran eager. :func:`_allow_recompiles` raises the limits with each network and makes hitting
    them an error instead of a fallback.
    """
    from dsctl.layers.static import RoutedNet

    if isinstance(module, RoutedNet):
        return RoutedNet(compile_module(module.front, backend), [compile_module(t, backend) for t in module.tails],
                         module.num_classes, module.first_route).eval()
    _allow_recompiles()
    return torch.compile(module, dynamic=True, backend=backend)


def _allow_recompiles() -> None:
    """Room in Dynamo's per-code cache for one more network, and an error (not eager) when it is full."""
    global _COMPILED
    import torch._dynamo.config as dynamo

    _COMPILED += 1
    need = 8 + _GRAPHS_PER_NETWORK * _COMPILED
    dynamo.recompile_limit = max(dynamo.recompile_limit, need)
    dynamo.accumulated_recompile_limit = max(dynamo.accumulated_recompile_limit, 2 * need)
    dynamo.fail_on_recompile_limit_hit = True


def package_program(program, path: str | Path) -> Path:
    """Compile a ``torch.export`` program into an AOTInductor package at ``path`` (a C++ compiler is needed:
    Inductor builds a shared library).

    Raises:
        DsctlError: Inductor could not compile it (its error, in one line).
    """
    path = Path(path)
    _check_aoti()
    try:
        out = torch._inductor.aoti_compile_and_package(program, package_path=str(path))
    except Exception as err:  # Inductor raises many types (compiler missing, lowering errors)
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise DsctlError(f"AOTInductor could not compile {path.name} ({type(err).__name__}: {first[:200]})") from None
    return Path(out)


def load_package(path: str | Path) -> nn.Module:
    """A callable module of an AOTInductor package (what ``torch._inductor.aoti_load_package`` returns, wrapped
    so that ``eval()``/``to()`` calls of callers are harmless)."""
    _check_aoti()
    return _Package(torch._inductor.aoti_load_package(str(path)))


def _check_aoti() -> None:
    import torch._inductor

    if not hasattr(torch._inductor, "aoti_compile_and_package"):
        raise DsctlError(f"AOTInductor packages need torch >= 2.6 (this is torch {torch.__version__}); use --format pt2")


class _Package(nn.Module):
    """An AOTInductor runner as an ``nn.Module``: compiled for eval on its device, ``train()`` changes nothing."""

    def __init__(self, runner) -> None:
        super().__init__()
        self.runner = runner

    def forward(self, x: torch.Tensor):
        return self.runner(x)
