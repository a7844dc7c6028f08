"""P4: the cost of training a supernet, against training the same networks as plain static ones.

Time: one sandwich step (``dsctl.train.supernet.sandwich_step``: largest, ``num_random`` random, smallest;
forward and backward each) against the same members as exported static networks, each one forward and
backward in a row. Memory: the step's peak allocation against one full-width static step's.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import Env, FigureRow, Settings, figure, median_s
from dsctl.config import SupernetConfig
from dsctl.latency import time_interleaved
from dsctl.registry import build_model
from dsctl.train.common import autocast
from dsctl.train.supernet import sample_members, sandwich_step

__all__ = ["bench_training", "peak_bytes"]


def peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak memory allocated while ``fn()`` runs, above what was allocated before it.

    CUDA: the caching allocator's peak. CPU: the profiler's allocation and free events, summed in time order.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # an op event carries what it allocated itself; "[memory]" events carry the frees (negative)
    deltas = sorted((e.time_range.start, e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage)
                    for e in prof.events())
    current = peak = 0
    for _, delta in deltas:
        current += delta
        peak = max(peak, current)
    return peak


def _static_step(nets: list[nn.Module], x: torch.Tensor, y: torch.Tensor, cfg: SupernetConfig,
                 device: torch.device, amp: bool) -> Callable[[], None]:
    def step() -> None:
        for net in nets:
            net.zero_grad(set_to_none=True)
            with autocast(device, amp):
                logits = net(x).float()
            F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing).backward()

    return step


def bench_training(model_name: str, settings: Settings, env: Env) -> list[FigureRow]:
    device, amp = settings.device, settings.device.type == "cuda"
    model = build_model(model_name).to(device).train()
    size = settings.train_size(model)
    cfg = SupernetConfig(target="id")  # in-place distillation: no teacher network to time
    specs = sample_members(model.space, random.Random(0), cfg.num_random)
    statics = [model.to_static(s).to(device).train().requires_grad_(True) for s in specs]
    x = settings.images(settings.train_batch, model.in_chans, size).float()  # fp32 weights, autocast on CUDA
    y = torch.randint(0, model.num_classes, (settings.train_batch,), generator=torch.Generator().manual_seed(0))
    y = y.to(device)

    def sandwich() -> None:
        model.zero_grad(set_to_none=True)
        sandwich_step(model, None, x, y, specs, cfg, device=device, amp=amp)

    members = _static_step(statics, x, y, cfg, device, amp)
    times = time_interleaved({"sandwich": sandwich, "static": members}, warmup=1,
                             min_run_time_s=settings.min_run_time_s, rounds=settings.rounds, threads=settings.threads)
    t_sw, t_st = median_s(times["sandwich"]) * 1e3, median_s(times["static"]) * 1e3
    labels = "+".join(model.space.label(s) for s in specs)
    rows = [figure(env, "p4", "sandwich_step_time", model_name, labels, settings.train_batch, size, t_sw / t_st,
                   numerator=("sandwich step", t_sw), denominator=("static members fwd+bwd", t_st), target="<=1.10",
                   samples=len(times["sandwich"]), note=f"{len(specs)} members, target=id")]
    full_static = _static_step(statics[:1], x, y, cfg, device, amp)  # specs[0] is the largest
    mem_sw, mem_st = peak_bytes(sandwich, device), peak_bytes(full_static, device)
    rows.append(figure(env, "p4", "sandwich_peak_memory", model_name, labels, settings.train_batch, size,
                       mem_sw / mem_st, numerator=("sandwich step peak MB", mem_sw / 2**20),
                       denominator=("full-width static step peak MB", mem_st / 2**20), parts_unit="MB",
                       target="<=1.2", note="peak above the memory allocated before the step"))
    return rows
