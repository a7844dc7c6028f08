"""P1 slicing overhead and P2 realised speed-up, from one interleaved run per model and batch size.

Candidates: the sliced supernet (``bind(model, spec)``) and its exported static twin
(``export_subnet``) for the smallest, middle and largest sub-networks, all six timed side by side.
P1 = sliced / static of the same width; P2 = (sliced largest / sliced sub-network) / (MACs largest / MACs
sub-network) at the largest batch, with the same figure for the static networks beside it (what the
hardware gives narrower dense layers, whatever slicing does).

Where a family's full network has a library twin of the same shapes (torchvision's ``resnet50``, timm's
DeiTs), that model runs beside them with the same weights: ``static_vs_reference`` = exported largest /
library model, what a user comparing dsctl's export with the model they know would see.

A further candidate is the static largest network again, under another name: ``timing_noise`` = its median
over the first one's. Both are the same module on the same input, so anything but 1.00 is the run's
resolution, the yardstick for P1's 3% target at batch 32 on a shared machine.
"""

from __future__ import annotations

from torch import nn

from benchmarks.common import Env, FigureRow, Settings, figure, median_ms
from dsctl.export import export_subnet
from dsctl.flops import count_macs
from dsctl.latency import measure_latency
from dsctl.models.base import Supernet, bind
from dsctl.registry import build_model
from dsctl.spec import SliceSpec

__all__ = ["bench_slicing", "P1_TARGETS", "P2_TARGETS"]

# the library model with the shapes of a family's full network (its state dict loads into the supernet)
REFERENCES = {"ds_resnet50": ("torchvision", "resnet50"), "ds_deit_small": ("timm", "deit_small_patch16_224"),
              "ds_deit_tiny": ("timm", "deit_tiny_patch16_224")}
P1_TARGETS = {1: "<=1.10"}  # batch 1; larger batches: "<=1.03"
P2_TARGETS = {"ds_resnet50": ">=0.8", "ds_deit_small": ">=0.8"}  # issue 11; MobileNet and DeiT-Ti: as measured


def _picks(model: Supernet) -> dict[str, SliceSpec]:
    space = model.space
    return {"smallest": space.smallest(), "middle": space.subnets[len(space.subnets) // 2], "largest": space.largest()}


def reference_model(model_name: str, model: Supernet) -> tuple[str, nn.Module] | None:
    """(label, library model) for ``model_name`` if it has one; ``model`` gets the library model's weights,
    so the two compute the same numbers (a strict load: the shapes are the same)."""
    if model_name not in REFERENCES:
        return None
    lib, name = REFERENCES[model_name]
    if lib == "torchvision":
        import torchvision

        ref = getattr(torchvision.models, name)()
    else:
        import timm

        ref = timm.create_model(name, pretrained=False)
    keys = model.load_state_dict(ref.state_dict(), strict=False)
    if keys.unexpected_keys:
        raise RuntimeError(f"{lib} {name} does not match {model_name}: {keys.unexpected_keys[:4]}")
    return f"{lib} {name}", ref.eval()


def bench_slicing(model_name: str, settings: Settings, env: Env, sections: set[str]) -> list[FigureRow]:
    """P1 rows (every batch) and P2 rows (the largest batch) of one registered model."""
    model = build_model(model_name).eval()
    reference = reference_model(model_name, model) if "p1" in sections else None
    picks = _picks(model)
    statics = {pick: export_subnet(model, spec) for pick, spec in picks.items()}
    p2_size = settings.input_size(model, settings.batches[-1])
    macs = {pick: count_macs(s, p2_size, model.in_chans) for pick, s in statics.items()} if "p2" in sections else {}
    model.to(settings.device, settings.dtype)
    statics = {pick: s.to(settings.device, settings.dtype) for pick, s in statics.items()}
    if reference is not None:
        reference = reference[0], reference[1].to(settings.device, settings.dtype)
    batches = settings.batches if "p1" in sections else settings.batches[-1:]
    label = {pick: model.space.label(spec) for pick, spec in picks.items()}
    rows: list[FigureRow] = []
    for batch in batches:
        size = settings.input_size(model, batch)
        x = settings.images(batch, model.in_chans, size)
        candidates = {}
        for pick, spec in picks.items():
            candidates[f"static {pick}"] = statics[pick]
            candidates[f"sliced {pick}"] = bind(model, spec)
        if "p1" in sections:
            candidates["static largest again"] = statics["largest"]
        if reference is not None:
            candidates[reference[0]] = reference[1]
        rounds = settings.rounds if batch == 1 else max(settings.rounds, settings.large_batch_rounds)
        reports = measure_latency(candidates, x, warmup=settings.warmup, min_run_time_s=settings.min_run_time_s,
                                  rounds=rounds, threads=settings.threads)
        ms = {name: median_ms(reports, name) for name in candidates}
        samples = min(r.samples for r in reports)
        if "p1" in sections:
            again = ("static largest again", ms["static largest again"])
            first = ("static largest", ms["static largest"])
            rows.append(figure(env, "p1", "timing_noise", model_name, label["largest"], batch, size,
                               again[1] / first[1], numerator=again, denominator=first, samples=samples,
                               note="A/A control: the same network twice"))
            if reference is not None:
                num, den = ("static largest", ms["static largest"]), (reference[0], ms[reference[0]])
                rows.append(figure(env, "p1", "static_vs_reference", model_name, label["largest"], batch, size,
                                   num[1] / den[1], numerator=num, denominator=den, samples=samples,
                                   note="same shapes, same weights"))
            for pick in picks:
                num, den = (f"sliced {pick}", ms[f"sliced {pick}"]), (f"static {pick}", ms[f"static {pick}"])
                rows.append(figure(env, "p1", "slicing_overhead", model_name, label[pick], batch, size, num[1] / den[1],
                                   numerator=num, denominator=den, target=P1_TARGETS.get(batch, "<=1.03"),
                                   samples=samples, note=pick))
        if "p2" in sections and batch == settings.batches[-1]:
            for pick in ("smallest", "middle"):
                macs_ratio = macs["largest"] / macs[pick]
                for kind, target in (("sliced", P2_TARGETS.get(model_name, "")), ("static", "")):
                    num, den = (f"{kind} largest", ms[f"{kind} largest"]), (f"{kind} {pick}", ms[f"{kind} {pick}"])
                    rows.append(figure(env, "p2", f"realised_speedup_{kind}", model_name, label[pick], batch, size,
                                       num[1] / den[1] / macs_ratio, numerator=num, denominator=den, target=target,
                                       macs_ratio=macs_ratio, samples=samples, note=pick))
    return rows
