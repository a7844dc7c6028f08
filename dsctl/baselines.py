"""Static baselines (DESIGN.md section 7): what dynamic slicing is compared against at equal cost.

* ``uniform``: the same architecture at one fixed width, trained alone with the same recipe (the
  supernet's ``to_uniform``: the static sub-network for CNNs, a DeiT of that width for DS-ViT);
* ``l1``: the full network trained, filters pruned by L1 norm to a MACs target, fine-tuned; for a
  transformer whole attention heads and MLP hidden units, the token width (residual stream) kept;
* ``slimming``: the full network trained with an L1 penalty on BatchNorm scales, channels pruned by
  BN scale to a MACs target, fine-tuned (network slimming; refused for families without BatchNorm).

Pruning uses Torch-Pruning's dependency graph (residual and SE couplings, attention heads included); the
pruning ratio that meets the MACs target is found by bisection, counting MACs with fvcore like
everything else (attention matmuls included).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dsctl.artifacts import StaticArtifact, StaticMeta, StaticReport, read_artifact
from dsctl.config import BaselineConfig, Recipe
from dsctl.errors import DsctlError
from dsctl.flops import count_macs, count_params, count_subnet
from dsctl.models.base import Supernet
from dsctl.train.progress import Progress
from dsctl.train.run import StopFlag

__all__ = ["prune_to_macs", "bn_l1_penalty", "launch_baseline", "resolve_target_macs", "check_baseline_methods"]

METHODS = ("uniform", "l1", "slimming")

logger = logging.getLogger(__name__)


def _classifier(net: nn.Module) -> nn.Linear:
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    return linears[-1]


def _transformer_options(net: nn.Module, ratio: float) -> dict[str, Any]:
    """Torch-Pruning options for a DS-ViT static network: whole heads and MLP hidden units, ``ratio`` of each
    per block (at least one head kept); the token width is kept (the embedding is ignored, so the residual
    stream's group is never pruned)."""
    from dsctl.layers.static_vit import Attention, TokenEmbed

    attention = [m for m in net.modules() if isinstance(m, Attention)]
    if not attention:
        return {}
    heads = {a.qkv: a.num_heads for a in attention}
    fewest = min(heads.values())
    embeds = [m for m in net.modules() if isinstance(m, TokenEmbed)]
    return {"num_heads": heads, "prune_num_heads": True, "prune_head_dims": False,
            "head_pruning_ratio": min(ratio, (fewest - 1) / fewest), "extra_ignored": embeds,
            "unwrapped_parameters": [(p, 2) for e in embeds for p in (e.cls_token, e.pos_embed)]}


def _pruner(net: nn.Module, example: Tensor, method: str, ratio: float):
    import torch_pruning as tp

    importance = tp.importance.BNScaleImportance() if method == "slimming" else tp.importance.MagnitudeImportance(p=1)
    pruner_cls = tp.pruner.BNScalePruner if method == "slimming" else tp.pruner.MagnitudePruner
    options = _transformer_options(net, ratio)
    ignored = [_classifier(net), *options.pop("extra_ignored", [])]
    # network slimming ranks BN scales across the whole network (one global threshold); L1 filter pruning
    # removes the same fraction of every layer
    return pruner_cls(net, example, importance=importance, pruning_ratio=ratio, ignored_layers=ignored,
                      global_pruning=method == "slimming", max_pruning_ratio=0.95, **options)


def prune_to_macs(net: nn.Module, target_macs: int, input_size: int, in_chans: int, method: str) -> tuple[nn.Module, float]:
    """Prune a copy of ``net`` (L1 filter norm or BN scale) to at most ``target_macs``; returns it and the ratio.

    A transformer (dsctl's static DS-ViT) loses whole attention heads and MLP hidden units by L1 norm, the
    same ratio of each per block; its attention then runs the remaining heads (the count follows ``qkv``).
    """
    net = net.eval().cpu()
    example = torch.zeros(1, in_chans, input_size, input_size)
    full = count_macs(net, input_size, in_chans)
    if target_macs >= full:
        raise DsctlError(f"target {target_macs / 1e6:.3f} MMACs is not below the full network's {full / 1e6:.3f}")

    def pruned(ratio: float) -> tuple[nn.Module, int]:
        candidate = copy.deepcopy(net)
        _pruner(candidate, example, method, ratio).step()
        return candidate, count_macs(candidate, input_size, in_chans)

    lo, hi = 0.0, 0.99
    best: tuple[nn.Module, float] | None = None
    for _ in range(12):
        mid = (lo + hi) / 2
        candidate, macs = pruned(mid)
        if macs <= target_macs:
            best, hi = (candidate, mid), mid
        else:
            lo = mid
    if best is None:
        raise DsctlError(f"could not prune to {target_macs / 1e6:.3f} MMACs (full: {full / 1e6:.3f})")
    return best


def bn_l1_penalty(weight: float):
    """Network slimming's sparsity term: ``weight * sum |gamma|`` over BatchNorm scales."""

    def penalty(net: nn.Module) -> Tensor:
        return weight * sum(m.weight.abs().sum() for m in net.modules() if isinstance(m, nn.BatchNorm2d))

    return penalty


def resolve_target_macs(supernet: Supernet, cfg: BaselineConfig, input_size: int) -> tuple[int, str]:
    """MACs target and a variant label: from ``target_macs_m``, or the MACs of the sub-network at ``width``."""
    if cfg.target_macs_m is not None:
        return int(cfg.target_macs_m * 1e6), f"macs{cfg.target_macs_m:g}M"
    if cfg.width is None:
        raise DsctlError("a baseline needs --width W or --target-macs M")
    spec = supernet.space.resolve(cfg.width)
    return count_subnet(supernet, spec, input_size).macs, f"w{cfg.width}"


def check_baseline_methods(supernet: Supernet, methods: tuple[str, ...] | list[str]) -> None:
    """DsctlError (one line) if a method cannot apply to this family: network slimming ranks BatchNorm scales."""
    if "slimming" in methods and not supernet.needs_bn_calibration:
        allowed = ", ".join(m for m in METHODS if m != "slimming")
        raise DsctlError(f"baseline method 'slimming' prunes by BatchNorm scales, and {supernet.model_name} has no "
                         f"BatchNorm (allowed for it: {allowed})")


def launch_baseline(recipe: Recipe, out: str | Path, *, device: str = "auto", resume: bool = False,
                    progress: Progress | None = None, stop: StopFlag | None = None,
                    allow_changed: bool = False, tensorboard: bool = False) -> dict[str, Any]:
    """Run one static baseline end to end in ``out``; returns its summary (also written to summary.json)."""
    from dsctl.train.launch import build_supernet_for, check_recipe_model_fits, prepare_run
    from dsctl.registry import build_model
    from dsctl.train.static import train_static

    cfg = recipe.baseline
    check_baseline_methods(build_model(recipe.model.name, **recipe.model.kwargs), [cfg.method])  # before any folder
    ctx = prepare_run(recipe, out, device=device, resume=resume, allow_changed=allow_changed, progress=progress,
                      stop=stop, check=lambda data: check_recipe_model_fits(recipe, data), tensorboard=tensorboard)
    supernet = build_supernet_for(recipe, ctx.data)
    size, chans = ctx.data.input_size, supernet.in_chans
    common = dict(cut_from=supernet, label_smoothing=cfg.label_smoothing)
    if cfg.method == "uniform":
        if cfg.width is None:
            raise DsctlError("--method uniform needs --width W (a slimming ratio of the supernet's space)")
        spec = supernet.space.resolve(cfg.width)
        meta = StaticMeta(method=cfg.method, base_spec=spec, variant=f"w{cfg.width}", width=supernet.space.ratio(spec))
        net, final = train_static(supernet.to_uniform(spec), ctx, recipe.optim, meta=meta, **common)
    else:
        target, variant = resolve_target_macs(supernet, cfg, size)
        full = supernet.space.full
        meta = StaticMeta(method=cfg.method, base_spec=full, variant=variant, target_macs=target)
        dense_ctx = ctx.sub("dense")
        penalty = bn_l1_penalty(cfg.slimming_lambda) if cfg.method == "slimming" else None
        if dense_ctx.run.final.is_file():
            dense = read_artifact(dense_ctx.run.final, StaticArtifact).build_network()
        else:
            dense, _ = train_static(supernet.to_static(full), dense_ctx, recipe.optim, meta=meta, extra_loss=penalty,
                                    **common)
        ft_ctx = ctx.sub("finetune")
        pruned, ratio = prune_to_macs(dense, target, size, chans, cfg.method)
        meta = dataclasses.replace(meta, pruning_ratio=round(ratio, 4))
        ft_optim = recipe.optim.model_copy(update={"epochs": cfg.finetune_epochs, "warmup_epochs": 0,
                                                   "lr": cfg.finetune_lr or recipe.optim.lr / 10})
        if cfg.finetune_epochs > 0:
            net, final = train_static(pruned, ft_ctx, ft_optim, meta=meta, **common)
        else:
            from dsctl.train.common import evaluate

            net = pruned.to(ctx.device)
            r = evaluate(net, ctx.data.val, None, ctx.device)
            final = StaticReport(top1=round(r.top1, 3), top5=round(r.top5, 3), loss=round(r.loss, 5))
        if ctx.dist.main:
            import shutil

            shutil.copyfile(ft_ctx.run.final if ft_ctx.run.final.is_file() else dense_ctx.run.final, ctx.run.final)
    net = net.cpu().eval()
    summary = {"kind": "static", "method": cfg.method, "model": supernet.model_name, "variant": meta.variant,
               "width": cfg.width, "macs": count_macs(net, size, chans), "params": count_params(net),
               **final.to_dict(), "meta": {"model_name": supernet.model_name, "model_kwargs": supernet.model_kwargs,
                                           **{k: v for k, v in meta.to_dict().items() if v is not None}}}
    if cfg.method != "uniform" and ctx.dist.main:  # the pruned network, whichever run wrote final.pt
        copied = read_artifact(ctx.run.final, StaticArtifact)
        dataclasses.replace(copied, meta=meta, state_dict=net.state_dict(), final=final).save(ctx.run.final)
    ctx.run.write_json("summary.json", summary)
    return summary
