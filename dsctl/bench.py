"""Benchmarks: sliced sub-networks against their exported static twins, dynamic routing against static
networks, and exported files; one :class:`BenchRow` per (candidate, batch size).

Every row records device, threads, dtype, batch, torch version and commit. Candidates compared with each
other are timed in one interleaved run (see :func:`dsctl.latency.measure_latency`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from dsctl.dynamic import DynamicNet, average_macs, masked_forward
from dsctl.export import export_routed, export_subnet, load_dynamic, load_subnet
from dsctl.flops import count_macs, gate_macs, macs_table
from dsctl.latency import measure_latency
from dsctl.models.base import Supernet, bind
from dsctl.spec import SearchSpace, SliceSpec, width_label

if TYPE_CHECKING:
    from dsctl.artifacts import Artifact, GateArtifact, StaticArtifact
    from dsctl.config import MeasureConfig

__all__ = ["BenchRow", "BenchSettings", "bench_widths", "bench_dynamic", "bench_module", "bench_exported",
           "bench_settings", "bench_specs", "bench_gate_run", "bench_static_run", "bench_target", "validation_images"]


@dataclass(frozen=True)
class BenchSettings:
    batches: tuple[int, ...] = (1, 32)
    device: str = "cpu"
    threads: int | None = None
    warmup: int = 10
    min_run_time_s: float = 1.0
    input_size: int | None = None
    rounds: int = 5
    compiled: bool = False  # torch.compile every plain-module candidate (dsctl.compiled); eager-only ones left out


@dataclass(frozen=True)
class BenchRow:
    """One timed candidate; ``ratio`` is its median latency over the reference's in the same run."""

    model: str
    candidate: str
    kind: str
    subnet: str
    width: str
    batch: int
    macs: int
    latency_ms_p50: float
    latency_ms_p90: float
    throughput: float
    ratio: float | None
    reference: str
    device: str
    threads: int
    dtype: str
    input_size: int
    torch_version: str
    commit: str
    compiled: bool = False


def _env(settings: BenchSettings) -> tuple[torch.device, int, str]:
    from dsctl.train.common import resolve_device
    from dsctl.train.run import git_commit

    device = resolve_device(settings.device)
    threads = settings.threads or torch.get_num_threads()  # measure_latency sets it while timing, then restores
    return device, threads, git_commit()


class _Cycle:
    """Calls ``fn`` on the next of several prepared batches each time (a realistic input mix)."""

    def __init__(self, fn: Callable[[Tensor], Tensor], batches: list[Tensor]) -> None:
        self.fn, self.batches, self.i = fn, batches, 0

    def __call__(self, _x: Tensor) -> Tensor:
        x = self.batches[self.i]
        self.i = (self.i + 1) % len(self.batches)
        return self.fn(x)


class _Parts:
    """The deployable routed model's two parts, each callable over the same cycled batches as the model:
    ``front`` (stem, pre-gate stages, gate) alone, and ``tails``, every route's static tail alone on the
    group of features the front sends it (grouped beforehand, so no gathering or scattering is timed).
    Their sum is what routing costs when the glue between them is free."""

    def __init__(self, routed: nn.Module, batches: list[Tensor]) -> None:
        from dsctl.layers.static import take_rows

        self.routed, self.groups = routed, []
        with torch.no_grad():
            for x in batches:
                h, routes = routed.front(x)
                self.groups.append([(i, take_rows(h, (routes == i).nonzero().squeeze(1)))
                                    for i in range(len(routed.tails)) if bool((routes == i).any())])
        self.front = _Cycle(routed.front, batches)
        self.i = 0

    def tails(self, _x: Tensor) -> list[Tensor]:
        groups = self.groups[self.i]
        self.i = (self.i + 1) % len(self.groups)
        return [self.routed.tails[i](h) for i, h in groups]


def _rows(model: str, reports, meta: dict[str, tuple[str, str, str, int]], reference: str, settings: BenchSettings,
          device: torch.device, threads: int, commit: str, input_size: int,
          eager: Sequence[str] = ()) -> list[BenchRow]:
    """Rows of one interleaved run; with ``settings.compiled`` every candidate ran compiled except ``eager``."""
    ref = next(r for r in reports if r.name == reference)
    rows = []
    for r in reports:
        kind, subnet, width, macs = meta[r.name]
        rows.append(BenchRow(model, r.name, kind, subnet, width, r.batch, macs, round(r.latency_ms_p50, 4),
                             round(r.latency_ms_p90, 4), round(r.throughput, 2),
                             round(r.latency_ms_p50 / ref.latency_ms_p50, 4), reference, str(device), threads,
                             "float32", input_size, torch.__version__, commit,
                             settings.compiled and r.name not in eager))
    return rows


def _maybe_compiled(module: nn.Module, settings: BenchSettings) -> nn.Module:
    if not settings.compiled:
        return module
    from dsctl.compiled import compile_module

    return compile_module(module)


def bench_widths(model: Supernet, specs: Sequence[SliceSpec], settings: BenchSettings) -> list[BenchRow]:
    """Each sliced sub-network against its exported static twin (ratio = sliced / static).

    Compiled (``settings.compiled``): the static sub-network compiled against the same network eager
    (``static_eager``; ratio = compiled / eager); the sliced supernet runs eager only and is left out.
    """
    device, threads, commit = _env(settings)
    size = settings.input_size or model.default_input_size
    model = model.eval().to(device)
    rows: list[BenchRow] = []
    for spec in specs:
        label = model.space.label(spec)
        width = width_text(model.space, spec)
        static = export_subnet(model, spec).to(device)
        macs = count_macs(static, size, model.in_chans)
        meta = {"static": ("static", label, width, macs), "sliced": ("sliced", label, width, macs),
                "static_eager": ("static", label, width, macs)}
        if settings.compiled:
            cands: dict[str, Callable[[Tensor], Tensor]] = {"static": _maybe_compiled(static, settings),
                                                            "static_eager": static}
            reference = "static_eager"
        else:
            cands, reference = {"static": static, "sliced": bind(model, spec)}, "static"
        for b in settings.batches:
            x = torch.randn(b, model.in_chans, size, size, device=device)
            reports = measure_latency(cands, x, warmup=settings.warmup, min_run_time_s=settings.min_run_time_s,
                                      rounds=settings.rounds, threads=threads)
            rows += _rows(model.model_name, reports, meta, reference, settings, device, threads, commit, size,
                          eager=("static_eager",))
    return rows


def bench_dynamic(model: Supernet, window: tuple[int, int], images: Tensor, settings: BenchSettings, *,
                  route_macs: list[int] | None = None, exported: Path | None = None,
                  torchscript: bool = False) -> list[BenchRow]:
    """Grouped dynamic inference on real images against: the window's widest and narrowest static
    sub-networks, masking the same routes at full width, the static sub-network closest to the dynamic
    average MACs and the one on the other side of that average (``static_bracket``: the two bracket it).

    Dynamic candidates: ``dynamic`` (the supernet, grouped and sliced), ``exported_dynamic`` (the
    deployable plain-torch :func:`~dsctl.export.export_routed` module, or the file ``exported``), its parts
    timed alone (kind ``part``: ``routed_front``, the front on the batch, and ``routed_tails``, every route's
    tail on its group, grouped beforehand; front + tails is the routed model's cost without glue) and, with
    ``torchscript`` (deprecated in torch 2.14; an option while it works), ``exported_dynamic_torchscript``:
    that module scripted, as ``dsctl export --dynamic`` writes it. ``images`` are real evaluation images
    (the gate's realistic route mix); each call takes the next batch of them. Ratios are over the widest
    static sub-network.
    """
    device, threads, commit = _env(settings)
    size = images.shape[-1]
    model = model.eval().to(device)
    route_macs = route_macs or macs_table(model, size)
    lo, hi = window
    dyn = DynamicNet(model, window)
    with torch.no_grad():
        routes = torch.cat([dyn.routes(c.to(device)) for c in images.split(256)]).cpu()
    avg = average_macs(torch.bincount(routes, minlength=model.space.num_subnets), route_macs, gate_macs(model, size))
    k_eq = min(range(model.space.num_subnets), key=lambda k: abs(route_macs[k] - avg))
    specs = model.space.subnets
    widest, equal = export_subnet(model, specs[hi]).to(device), export_subnet(model, specs[k_eq]).to(device)
    candidates: dict[str, Callable[[Tensor], Tensor]] = {
        "static_widest": widest, "dynamic": dyn, "masked": lambda x: masked_forward(model, x, window),
        "static_equal_macs": equal,
    }
    r = lambda k: width_text(model.space, specs[k])  # noqa: E731
    meta = {"static_widest": ("static", f"k{hi}", r(hi), route_macs[hi]),
            "dynamic": ("dynamic", f"dynamic[{lo}:{hi}]", "dynamic", round(avg)),
            "masked": ("masked", f"masked[{lo}:{hi}]", "dynamic", route_macs[hi]),
            "static_equal_macs": ("static", f"k{k_eq}", r(k_eq), route_macs[k_eq])}
    routed = export_routed(model, window).to(device)
    candidates["exported_dynamic"] = load_dynamic(exported).to(device) if exported is not None else routed
    meta["exported_dynamic"] = ("exported_dynamic", f"dynamic[{lo}:{hi}]", "dynamic", round(avg))
    # the window's cheapest member, and the sub-network on the other side of the routed cost from the
    # closest one (the two statics that bracket the routed cost interpolate a static of equal MACs)
    below = max((k for k in range(lo, hi + 1) if route_macs[k] <= avg), default=lo)
    other = below + 1 if below == k_eq else below
    for name, k in (("static_narrowest", lo), ("static_bracket", min(other, hi))):
        if k not in (k_eq, hi) and not any(m[1] == f"k{k}" for m in meta.values()):
            candidates[name] = export_subnet(model, specs[k]).to(device)
            meta[name] = ("static", f"k{k}", r(k), route_macs[k])
    if settings.compiled:  # every plain module compiled; the supernet's own routing runs eager only: left out
        for name in ("dynamic", "masked"):
            del candidates[name], meta[name]
        candidates = {name: _maybe_compiled(m, settings) for name, m in candidates.items()}  # type: ignore[arg-type]
        torchscript = False
    if torchscript:
        candidates["exported_dynamic_torchscript"] = torch.jit.script(routed)
        meta["exported_dynamic_torchscript"] = ("exported_dynamic", f"dynamic[{lo}:{hi}] torchscript", "dynamic",
                                                round(avg))
    front_macs = count_macs(routed.front, size, model.in_chans)
    meta["routed_front"] = ("part", f"front of dynamic[{lo}:{hi}]", "dynamic", front_macs)
    meta["routed_tails"] = ("part", f"tails of dynamic[{lo}:{hi}]", "dynamic", round(avg) - front_macs)
    rows: list[BenchRow] = []
    for b in settings.batches:
        n = max(1, min(16, images.shape[0] // b))
        batches = [images[i * b : (i + 1) * b].to(device) for i in range(n)]
        cycled = {name: _Cycle(fn, batches) for name, fn in candidates.items()}
        parts = _Parts(candidates["exported_dynamic"], batches)  # type: ignore[arg-type]
        cycled["routed_front"], cycled["routed_tails"] = parts.front, parts.tails
        reports = measure_latency(cycled, batches[0], warmup=settings.warmup, min_run_time_s=settings.min_run_time_s,
                                  rounds=settings.rounds, threads=threads)
        rows += _rows(model.model_name, reports, meta, "static_widest", settings, device, threads, commit, size)
    return rows


def bench_module(name: str, module: nn.Module, in_chans: int, input_size: int, settings: BenchSettings, *,
                 kind: str = "static", subnet: str = "-", width: str = "-", macs: int | None = None) -> list[BenchRow]:
    """Latency of one plain module (an exported file or a baseline network)."""
    device, threads, commit = _env(settings)
    try:
        module = module.eval()
    except NotImplementedError:  # torch.export modules refuse .eval(); they are exported in eval mode
        pass
    module = module.to(device)
    macs = count_macs(module, input_size, in_chans) if macs is None else macs
    module = _maybe_compiled(module, settings)
    rows: list[BenchRow] = []
    for b in settings.batches:
        x = torch.randn(b, in_chans, input_size, input_size, device=device)
        reports = measure_latency({name: module}, x, warmup=settings.warmup, min_run_time_s=settings.min_run_time_s,
                                  rounds=settings.rounds, threads=threads)
        rows += _rows(name, reports, {name: (kind, subnet, width, macs)}, name, settings, device, threads, commit,
                      input_size)
    return rows


def bench_exported(path: str | Path, settings: BenchSettings) -> list[BenchRow]:
    """Latency of an exported file, with shapes and labels from its JSON sidecar."""
    import json

    from dsctl.errors import CheckpointError

    from dsctl.export import DYNAMIC_SIDECAR

    sidecar = Path(path) / DYNAMIC_SIDECAR if Path(path).is_dir() else Path(str(path) + ".json")
    if not sidecar.is_file():
        raise CheckpointError(f"{path}: no sidecar {sidecar.name} (export it with dsctl export)")
    meta = json.loads(sidecar.read_text())
    module = load_dynamic(path) if meta.get("kind") == "dynamic" else load_subnet(path)
    size = settings.input_size or meta["input_size"]
    return bench_module(meta["model"], module, meta["in_chans"], size, settings, kind="exported",
                        subnet=meta.get("subnet", "dynamic"), width=str(meta.get("width", "dynamic")),
                        macs=int(meta.get("macs") or 0))


# -- what `dsctl bench TARGET` times --------------------------------------------------------------------------
def bench_settings(measure: MeasureConfig, *, batches: Sequence[int] | None = None, device: str = "cpu",
                   threads: int | None = None, min_run_time_s: float | None = None,
                   input_size: int | None = None, compiled: bool = False) -> BenchSettings:
    """Settings from the values given, the unset ones from a recipe's ``measure`` section."""
    return BenchSettings(tuple(batches) if batches else measure.batch_sizes, device, threads or measure.threads,
                         measure.warmup, min_run_time_s or measure.min_run_time_s, input_size, compiled=compiled)


def width_text(space: SearchSpace, spec: SliceSpec) -> str:
    """A bench row's width: the slimming ratio (or ``largest``), with the kernel size or MLP ratio where the
    space routes them (``0.5@5``, ``0.75@mlp2``)."""
    return space.name(spec) if space.routes_more_than_width else str(width_label(space.width(spec)))


def bench_specs(space: SearchSpace, widths: Sequence[str] | None = None) -> list[SliceSpec]:
    """The sub-networks to time: ``widths`` (``["all"]``: every indexed one and the full network); by
    default the smallest, the first one at ratio 0.5 if the space has it (in a kernel space, at its smallest
    kernel), and the full network."""
    if widths is None:
        half = [s for s in space.subnets if space.ratio(s) == 0.5][:1]
        return list(dict.fromkeys([space.smallest(), *half, space.full]))
    if list(widths) == ["all"]:
        return list(space.all_specs())
    return [space.resolve(w) for w in widths]


def validation_images(art: Artifact, n: int) -> Tensor:
    """The first ``n`` images of the validation split of a run's recipe (fewer if it is smaller)."""
    from dsctl.train.data import build_run_data

    data = build_run_data(art.recipe_config().data)
    art.check_data(data.info)
    chunks, seen = [], 0
    for x, _ in data.val:
        chunks.append(x)
        seen += x.shape[0]
        if seen >= n:
            break
    return torch.cat(chunks)[:n]


def bench_gate_run(gate: GateArtifact, settings: BenchSettings) -> list[BenchRow]:
    """A gate run's dynamic model (:func:`bench_dynamic`) on real validation images of its recipe, with the
    route costs the run stored."""
    model = gate.build_model()
    images = validation_images(gate, max(512, 16 * max(settings.batches)))
    return bench_dynamic(model, gate.window, images, settings, route_macs=list(gate.costs.route_macs))


def bench_static_run(art: StaticArtifact, settings: BenchSettings) -> list[BenchRow]:
    """A baseline network (uniform or pruned) from its run, at the run's input size unless settings say."""
    meta = art.meta
    return bench_module(f"{art.model_name}:{meta.method}", art.build_network(),
                        art.data_info.in_chans if art.data_info else 3, settings.input_size or art.input_size,
                        settings, kind=meta.method, subnet=meta.variant or "-", width=meta.width_label)


def bench_target(target: str | Path, *, widths: Sequence[str] | None = None, dynamic: bool = False,
                 batches: Sequence[int] | None = None, device: str = "cpu", threads: int | None = None,
                 min_run_time_s: float | None = None, input_size: int | None = None,
                 compiled: bool = False) -> list[BenchRow]:
    """What ``dsctl bench TARGET`` times, by what TARGET is (``compiled``: under ``torch.compile``, see
    :class:`BenchSettings`):

    * an exported file (it has a JSON sidecar): :func:`bench_exported`;
    * a gate run or checkpoint with ``dynamic``: :func:`bench_gate_run`;
    * a baseline run: :func:`bench_static_run`;
    * a supernet or gate run, or a registered model name: :func:`bench_widths` over
      :func:`bench_specs` ``(widths)``, at the run's input size.

    Settings left None come from the run's recipe (``measure``), else :class:`~dsctl.config.MeasureConfig`.

    Raises:
        CheckpointError: ``dynamic`` and TARGET is not a gate run, or TARGET is not a readable checkpoint.
        DsctlError: TARGET is neither a file, a run folder nor a registered model.
    """
    from dsctl.artifacts import Artifact, GateArtifact, ModelArtifact, StaticArtifact, read_artifact
    from dsctl.config import MeasureConfig
    from dsctl.export import is_exported
    from dsctl.targets import ModelTarget, load_model_target

    path = Path(target)
    exported = is_exported(path)
    art = None
    if not exported and (dynamic or path.exists()):
        art = read_artifact(path, GateArtifact if dynamic else Artifact, why="--dynamic" if dynamic else "")
    measure = art.recipe_config().measure if art is not None and art.recipe else MeasureConfig()
    settings = bench_settings(measure, batches=batches, device=device, threads=threads,
                              min_run_time_s=min_run_time_s, input_size=input_size, compiled=compiled)
    if exported:
        return bench_exported(path, settings)
    if dynamic:
        return bench_gate_run(art, settings)  # type: ignore[arg-type]
    if isinstance(art, StaticArtifact):
        return bench_static_run(art, settings)
    t = ModelTarget.of_artifact(art) if isinstance(art, ModelArtifact) else load_model_target(str(target))
    settings = replace(settings, input_size=input_size or t.input_size)
    return bench_widths(t.model, bench_specs(t.model.space, widths), settings)
