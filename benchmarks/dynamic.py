"""P3: dynamic inference with the deployable routed model at a realistic route mix.

No trained gate is needed: the gate's slimming head gets seeded random weights, and the per-route offsets
are calibrated (``calibrate_offsets``) so the routed average MACs on the timed images is a target, which
spreads the images over the window as a trained, calibrated gate does. Two mixes: the four sub-networks
around the middle one at its MACs, and the gates' default window (``gate.window_size`` sub-networks around
the target) halfway between the middle one and the next (see :func:`bench_routing`). ``dsctl.bench.bench_dynamic``
then times, side by side on the same images: the deployed routed model (plain torch, no TorchScript),
its TorchScript twin, grouped sliced inference in the supernet, masking at full width, and the static
sub-network closest to the average MACs.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from benchmarks.common import Env, FigureRow, Settings, figure
from dsctl.bench import BenchRow, BenchSettings, bench_dynamic
from dsctl.config import GateConfig
from dsctl.dynamic import gate_logits
from dsctl.flops import macs_table
from dsctl.models.base import Supernet
from dsctl.registry import build_model
from dsctl.routing import calibrate_offsets, choose_window

__all__ = ["bench_routing", "mixed_routes"]


@torch.no_grad()
def mixed_routes(model: Supernet, images: torch.Tensor, route_macs: list[int], target: float, size: int,
                 seed: int = 0) -> tuple[int, int]:
    """Give the gate a random slimming head and offsets calibrated to spend ``target`` MACs on ``images``
    over the ``size`` sub-networks around it; returns the routing window."""
    window = choose_window(route_macs, target, size=size)
    lo, hi = window
    gen = torch.Generator().manual_seed(seed)
    head = model.gate.head
    head.weight.copy_(torch.randn(head.weight.shape, generator=gen))
    head.bias.zero_()
    first = model.space.subnets[lo]
    encodings = torch.cat([model.forward_pre(c, first, encode=True).encoding for c in images.split(64)])
    calib = calibrate_offsets(gate_logits(model, encodings, window), route_macs[lo : hi + 1], target)
    model.gate.route_bias.zero_()
    model.gate.route_bias[lo : hi + 1] = torch.tensor(calib.offsets)
    return window


def bench_routing(model_name: str, settings: Settings, env: Env) -> list[FigureRow]:
    """Two route mixes: the four sub-networks around the middle one, spending its MACs (a static network of
    exactly equal MACs exists); and the gates' default window (``gate.window_size`` sub-networks around
    the target) at the MACs halfway between the middle one and the next, compared with the latency
    interpolated in MACs between the two static networks that bracket the routed cost (no static network
    has that cost)."""
    model = build_model(model_name).eval()
    size = settings.input_size(model, settings.dynamic_batch)
    # in the run's dtype and layout; bench_dynamic moves each batch to the device
    images = settings.images(4 * settings.dynamic_batch, model.in_chans, size, seed=1).cpu()
    route_macs = macs_table(model, size)
    k_mid = model.space.num_subnets // 2
    bench = BenchSettings(batches=(settings.dynamic_batch,), device=str(settings.device), threads=settings.threads,
                          warmup=settings.warmup, min_run_time_s=settings.min_run_time_s, input_size=size,
                          rounds=settings.rounds)
    # the default window is also timed at batch 1 and 32: routed_vs_parts at every deployment batch
    glue_batches = tuple(sorted({1, *settings.batches, settings.dynamic_batch}))
    out: list[FigureRow] = []
    # (window size, MACs target, whether no static network has that cost: compare with the interpolation)
    mixes = ((4, route_macs[k_mid], False),
             (GateConfig().window_size, (route_macs[k_mid] + route_macs[k_mid + 1]) / 2, True))
    for size_w, target, interpolate in mixes:
        model.float()
        window = mixed_routes(model, images.float(), route_macs, target, size_w)
        model.to(settings.dtype)
        run = replace(bench, batches=glue_batches, rounds=max(bench.rounds, 9)) if interpolate else bench
        rows = bench_dynamic(model, window, images, run, route_macs=route_macs, torchscript=not interpolate)
        out += _figures(model_name, [r for r in rows if r.batch == settings.dynamic_batch], window, size, env,
                        interpolate=interpolate)
        if interpolate:
            out += [_glue_figure(model_name, [r for r in rows if r.batch == b], window, size, env) for b in glue_batches]
    return out


def _glue_figure(model_name: str, rows: list[BenchRow], window: tuple[int, int], size: int, env: Env) -> FigureRow:
    """``routed_vs_parts``: the deployable routed model's latency over its front's plus its tails' on the
    same groups, each timed alone in the same interleaved run (what grouping, gathering and scattering add)."""
    by = {r.candidate: r for r in rows}
    dyn, front, tails = by["exported_dynamic"], by["routed_front"], by["routed_tails"]
    parts = front.latency_ms_p50 + tails.latency_ms_p50
    note = (f"window k{window[0]}..k{window[1]}, avg {dyn.macs / 1e6:.0f}M MACs, random head + calibrated offsets; "
            f"front {front.latency_ms_p50:.3f} ms + tails {tails.latency_ms_p50:.3f} ms")
    return figure(env, "p3", "routed_vs_parts", model_name, dyn.subnet, dyn.batch, size, dyn.latency_ms_p50 / parts,
                  target="<=1.05", note=note, numerator=(dyn.candidate, dyn.latency_ms_p50),
                  denominator=("routed_front + routed_tails", parts))


def _figures(model_name: str, rows: list[BenchRow], window: tuple[int, int], size: int, env: Env, *,
             interpolate: bool) -> list[FigureRow]:
    by = {r.candidate: r for r in rows}
    dyn = by["exported_dynamic"]
    mix = f"window k{window[0]}..k{window[1]}, avg {dyn.macs / 1e6:.0f}M MACs, random head + calibrated offsets"

    def row(name: str, other_label: str, other_ms: float, target: str = "") -> FigureRow:
        # other's median latency / the routed model's = the routed model's throughput / other's
        return figure(env, "p3", name, model_name, dyn.subnet, dyn.batch, size, other_ms / dyn.latency_ms_p50,
                      target=target, note=mix, numerator=(other_label, other_ms),
                      denominator=(dyn.candidate, dyn.latency_ms_p50))

    def of(r: BenchRow) -> tuple[str, float]:
        return f"{r.candidate} {r.subnet}", r.latency_ms_p50

    if interpolate:
        # the two timed statics that bracket the routed cost (by MACs, not candidate name: either may be
        # timed as `static_equal_macs`, `static_narrowest`, `static_bracket` or `static_widest`)
        statics = sorted((r for r in rows if r.kind == "static"), key=lambda r: r.macs)
        lo = max((r for r in statics if r.macs <= dyn.macs), key=lambda r: r.macs)
        hi = min((r for r in statics if r.macs > dyn.macs), key=lambda r: r.macs)
        t = (dyn.macs - lo.macs) / (hi.macs - lo.macs)
        ref = lo.latency_ms_p50 + t * (hi.latency_ms_p50 - lo.latency_ms_p50)
        return [row("dynamic_vs_interpolated_static", f"{lo.subnet}..{hi.subnet} at {t:.2f}", ref, ">=0.9"),
                row("dynamic_vs_masked", *of(by["masked"]))]
    # the last two run the same routing another way: grouped slicing in the supernet, TorchScript
    return [row("dynamic_vs_static_equal_macs", *of(by["static_equal_macs"]), ">=0.9"),
            row("dynamic_vs_masked", *of(by["masked"])), row("supernet_grouped_vs_exported", *of(by["dynamic"])),
            row("torchscript_vs_exported", *of(by["exported_dynamic_torchscript"]))]
