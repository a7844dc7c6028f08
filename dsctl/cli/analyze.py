"""``dsctl analyze``: routing headroom of a supernet before a gate is trained."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from dsctl.cli._common import Output, handle_errors, progress_display
from dsctl.cli.options import CsvOpt, DataOpt, DeviceOpt, JsonOpt, QuietOpt, SetOpt, deprecated, recipe_overrides

app = typer.Typer()


class Split(str, Enum):
    val = "val"
    holdout = "holdout"


@app.command("analyze")
@handle_errors
def analyze_cmd(
    target: Annotated[Path, typer.Argument(help="Supernet run folder or checkpoint.")],
    data: DataOpt = None,
    out: Annotated[Path | None, typer.Option(help="Output folder (default: analysis/ in the run folder, or "
                                                  "analysis-holdout/ there for --split holdout).")] = None,
    split: Annotated[Split, typer.Option(help="val: the recipe's validation/test split; holdout: the last part of the "
                                              "training set, without augmentation.")] = Split.val,
    max_batches: Annotated[int | None, typer.Option(min=1, help="Use only the first N batches of the split.")] = None,
    batches: Annotated[int | None, typer.Option(min=1, hidden=True, help="Deprecated: --max-batches.")] = None,
    holdout_fraction: Annotated[float, typer.Option(min=0.0, max=0.5, help="Fraction of the training set held out "
                                                                           "(--split holdout).")] = 0.1,
    target_macs: Annotated[float | None, typer.Option(min=0.0, help="Average-MACs budget of the probe routers, in "
                                                                    "millions (default: midway between the smallest "
                                                                    "and widest indexed sub-network).")] = None,
    budget: Annotated[float | None, typer.Option(min=0.0, hidden=True, help="Deprecated: --target-macs.")] = None,
    latency: Annotated[bool, typer.Option(help="Time the latency headroom on this device: every sub-network at batch "
                                               "1 and --latency-batch, the front's share, the oracle's routes "
                                               "through the deployable routed model.")] = True,
    latency_batch: Annotated[int, typer.Option(min=1, help="The larger batch size timed (besides batch 1).")] = 32,
    threads: Annotated[int | None, typer.Option(min=1, help="CPU threads while timing (default: torch's).")] = None,
    min_run_time: Annotated[float, typer.Option(min=0.01, help="Seconds of timing per candidate and batch "
                                                               "size.")] = 0.5,
    set_: SetOpt = None,
    device: DeviceOpt = "auto",
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
    csv: CsvOpt = None,
) -> None:
    """Per-sample correctness of every sub-network, the oracle router (each sample to its cheapest correct
    sub-network, and the best routing per MACs budget), how well features at each candidate gate
    position predict that the smallest sub-network is wrong, and whether routing can pay in time on this
    device (latency of every sub-network, the front's share, the oracle's best time per budget)."""
    from dsctl.analyze import analyze_checkpoint

    batches = deprecated("--batches", "--max-batches", batches, max_batches)
    budget = deprecated("--budget", "--target-macs", budget, target_macs)
    with progress_display(quiet or as_json) as progress:
        a = analyze_checkpoint(target, split=split.value, out_dir=out, overrides=recipe_overrides(set_, data),
                               max_batches=batches, device=device, holdout_fraction=holdout_fraction,
                               budget_macs=None if budget is None else budget * 1e6,
                               latency_batch=latency_batch if latency else None, threads=threads,
                               min_run_time_s=min_run_time, progress=progress)
    with Output(as_json, csv) as out:
        _print(out, a.summary)
        out.note("wrote " + ", ".join(str(p) for p in a.paths))


def _print(out: Output, s: dict) -> None:
    d, o = s["data"], s["oracle"]
    out.show(f"{s['model']} on {d['source']} {d['split']} ({d['samples']} samples)",
                        ["subnet", "width", "MACs (M)", "top1", "oracle share"], [
        [r["subnet"], f"{r['width']:g}", f"{r['macs'] / 1e6:.3f}", f"{r['top1']:.2f}",
         f"{r['oracle_samples'] / d['samples']:.1%}"] for r in s["subnets"]], records=s["subnets"], name="subnets")
    out.show("oracle router (each sample to its cheapest correct sub-network; gate cost excluded)",
                        ["top1", "avg MACs (M)", "none right", "smallest wrong"],
                        [[f"{o['top1']:.2f}", f"{o['avg_macs'] / 1e6:.3f}", f"{o['none_right']:.1%}",
                          f"{s['smallest_wrong']:.1%}"]], records=[{**o, "smallest_wrong": s["smallest_wrong"]}],
             name="oracle")
    if s["probes"]:
        budget = s["probe_budget_macs"] / 1e6
        out.show(f"linear probes for 'smallest is wrong' (routing top-q wide at {budget:.3f} M MACs)",
                            ["position", "channels", "AUC", "top1", "random top1", "oracle top1"], [
            [p["position"] + (" (gate)" if p["gate"] else ""), p["channels"],
             "-" if p["auc"] is None else f"{p['auc']:.3f}", *(f"{p[k]:.2f}" if k in p else "-"
                                                               for k in ("top1", "random_top1", "oracle_top1"))]
            for p in s["probes"]], records=s["probes"], name="probes")
    if "latency" in s:
        lat = s["latency"]
        n = lat["batches"][1]
        out.show(f"latency headroom ({lat['device']}, {lat['threads']} threads; ms per batch, median)",
                            ["subnet", "MACs (M)", "ms b1", f"ms b{n}", "front ms b1", f"front ms b{n}"], [
            [f"k{k}", f"{m / 1e6:.3f}", f"{lat['table']['front_ms'][0] + t1:.3f}",
             f"{lat['table']['front_ms'][1] + tn:.3f}", f"{lat['table']['front_ms'][0]:.3f}",
             f"{lat['table']['front_ms'][1]:.3f}"]
            for k, (m, t1, tn) in enumerate(zip(lat["table"]["macs"], *lat["table"]["tail_ms"]))], name="latency")
        out.show("oracle routing through the deployable routed model (its best time per MACs budget)",
                            ["avg MACs (M)", "top1", "ms b1", f"ms b{n}", "best static top1 as fast, b1",
                             f"... b{n}"], [
            [f"{r['avg_macs'] / 1e6:.3f}", f"{r['top1']:.2f}", f"{r['ms_b1']:.3f}", f"{r[f'ms_b{n}']:.3f}",
             *("-" if r[k] is None else f"{r[k]:.2f}"
               for k in ("best_static_top1_as_fast_b1", f"best_static_top1_as_fast_b{n}"))]
            for r in lat["oracle"]], records=lat["oracle"], name="oracle_latency")
        for line in lat["verdicts"]:
            out.note(line)
