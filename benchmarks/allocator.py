"""How freed CPU memory is handled while benchmarks run: glibc's defaults, or kept for reuse.

With glibc's defaults every allocation above the mmap threshold (at most 32 MB) is mapped fresh and
unmapped when freed, so a network whose activations exceed it pays first-touch page faults on every
forward: DS-ResNet-50 at batch 32, 128 px ran 1.5-1.9x slower that way on the project's 2-core machine,
and the narrow sub-networks, whose unsliced stem holds the biggest activations, slowed most (see
benchmarks/README.md). ``retain`` keeps freed memory in the heap for the next forward, what jemalloc or
tcmalloc (PyTorch's CPU tuning advice) or ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000`` give a
deployment. Both sides of every ratio run under the same setting, and every CSV row records it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["ALLOCATORS", "allocator_setting"]

ALLOCATORS = ("retain", "system")
# mallopt(3) parameters and glibc's defaults for them (restored on exit; the dynamic mmap threshold glibc
# starts with cannot be restored: after any mallopt it stays at the value set)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4
_GLIBC_DEFAULTS = {_M_MMAP_MAX: 65536, _M_TRIM_THRESHOLD: 128 * 1024, _M_MMAP_THRESHOLD: 128 * 1024}
_RETAIN = {_M_MMAP_MAX: 0, _M_TRIM_THRESHOLD: 2**31 - 1}
# what child processes (P5's fresh dsctl processes) get for the same behaviour
_RETAIN_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**31 - 1)}


def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


@contextmanager
def allocator_setting(name: str) -> Iterator[str]:
    """Run the block under allocator setting ``name``; yields what is in effect (``system`` where
    ``retain`` is not available: not glibc)."""
    if name not in ALLOCATORS:
        raise ValueError(f"allocator {name!r} is not known (allowed: {', '.join(ALLOCATORS)})")
    libc = _glibc() if name == "retain" else None
    if libc is None:
        yield "system"
        return
    saved_env = {k: os.environ.get(k) for k in _RETAIN_ENV}
    for param, value in _RETAIN.items():
        libc.mallopt(param, value)
    os.environ.update(_RETAIN_ENV)
    try:
        yield "retain"
    finally:
        for param, value in _GLIBC_DEFAULTS.items():
            libc.mallopt(param, value)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
