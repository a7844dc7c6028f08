"""P3: dynamic inference with the deployable routed model at a realistic route mix.

No trained gate is needed: the gate's slimming head gets seeded random weights, the window is the four
sub-networks around the middle one's MACs (``choose_window``), and the per-route offsets are calibrated
(``calibrate_offsets``) so the routed average MACs on the timed images is that middle MACs, which
spreads the images over the window as a trained, calibrated gate does. ``dsctl.bench.bench_dynamic``
then times, side by side on the same images: the deployed routed model (plain torch, no TorchScript),
its TorchScript twin, grouped sliced inference in the supernet, masking at full width, and the static
sub-network closest to the average MACs.
"""

from __future__ import annotations

import torch

from benchmarks.common import Env, FigureRow, Settings, figure
from dsctl.bench import BenchRow, BenchSettings, bench_dynamic
from dsctl.dynamic import gate_logits
from dsctl.flops import macs_table
from dsctl.models.base import Supernet
from dsctl.registry import build_model
from dsctl.routing import calibrate_offsets, choose_window

__all__ = ["bench_routing", "mixed_routes"]


@torch.no_grad()
def mixed_routes(model: Supernet, images: torch.Tensor, route_macs: list[int], seed: int = 0) -> tuple[int, int]:
    """Give the gate a random slimming head and calibrated offsets; returns the routing window."""
    k_mid = model.space.num_subnets // 2
    window = choose_window(route_macs, route_macs[k_mid], size=4)
    lo, hi = window
    gen = torch.Generator().manual_seed(seed)
    head = model.gate.head
    head.weight.copy_(torch.randn(head.weight.shape, generator=gen))
    head.bias.zero_()
    first = model.space.subnets[lo]
    encodings = torch.cat([model.forward_pre(c, first, encode=True).encoding for c in images.split(64)])
    calib = calibrate_offsets(gate_logits(model, encodings, window), route_macs[lo : hi + 1], route_macs[k_mid])
    model.gate.route_bias.zero_()
    model.gate.route_bias[lo : hi + 1] = torch.tensor(calib.offsets)
    return window


def bench_routing(model_name: str, settings: Settings, env: Env) -> list[FigureRow]:
    model = build_model(model_name).eval()
    size = settings.input_size(model, settings.dynamic_batch)
    # in the run's dtype and layout; bench_dynamic moves each batch to the device
    images = settings.images(4 * settings.dynamic_batch, model.in_chans, size, seed=1).cpu()
    route_macs = macs_table(model, size)
    window = mixed_routes(model, images.float(), route_macs)
    model.to(settings.dtype)
    bench = BenchSettings(batches=(settings.dynamic_batch,), device=str(settings.device), threads=settings.threads,
                          warmup=settings.warmup, min_run_time_s=settings.min_run_time_s, input_size=size,
                          rounds=settings.rounds)
    rows = bench_dynamic(model, window, images, bench, route_macs=route_macs, torchscript=True)
    by = {r.candidate: r for r in rows}
    dyn = by["exported_dynamic"]
    mix = f"window k{window[0]}..k{window[1]}, avg {dyn.macs / 1e6:.0f}M MACs, random head + calibrated offsets"

    def row(name: str, other: BenchRow, target: str = "") -> FigureRow:
        # other's median latency / the routed model's = the routed model's throughput / other's
        return figure(env, "p3", name, model_name, dyn.subnet, dyn.batch, size,
                      other.latency_ms_p50 / dyn.latency_ms_p50, target=target, note=mix,
                      numerator=(f"{other.candidate} {other.subnet}", other.latency_ms_p50),
                      denominator=(dyn.candidate, dyn.latency_ms_p50))

    # the last two run the same routing another way: grouped slicing in the supernet, TorchScript
    return [row("dynamic_vs_static_equal_macs", by["static_equal_macs"], ">=0.9"),
            row("dynamic_vs_masked", by["masked"]), row("supernet_grouped_vs_exported", by["dynamic"]),
            row("torchscript_vs_exported", by["exported_dynamic_torchscript"])]
