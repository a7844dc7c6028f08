"""From a pretrained static network to a dynamic one: importance-ordered conversion (issue 23).

Weight slicing runs a sub-network on the **first** k channels of every sliced dimension. A network trained
without slicing never ordered its channels, so its first k are a random subset: loaded into a supernet as
it is (``--init-from``), its narrow sub-networks start near chance. Conversion permutes every sliceable
dimension so that the most important units come first, without changing the function at full width:

* **Coupled groups.** Channels that must move together (a conv's output channels, its BatchNorm, the input
  channels of every layer that reads them, the residual stream of a stage, a bottleneck's mid channels; a
  transformer's heads, MLP hidden units and embedding channels) form a :class:`ChannelGroup`. For the
  CNN families the groups come from Torch-Pruning's dependency graph, traced through the supernet at full
  width; DS-ViT describes its own (``DSViT.channel_groups``): whole heads across q, k, v and the output
  projection, MLP units across fc1 and fc2, and the token channels across every layer.
* **Importance.** Torch-Pruning's group criteria, computed on the group's coupled weights: ``l1`` / ``l2``
  (the sum over the group's weights of each unit's L1 / L2 norm, BatchNorm scales included, as
  ``GroupMagnitudeImportance`` with sum reduction), ``bn_scale`` (|gamma| of the group's BatchNorms, network
  slimming's criterion; families with BatchNorm only), ``taylor`` (first-order Taylor, sum of |w * dL/dw|
  over the group, gradients of the full network's cross-entropy on a few training batches).
* **Permutation.** Each group's units are sorted by importance, most important first, and every member
  tensor is re-indexed; the narrower widths' BatchNorm statistics restart from the permuted full width's
  first channels, and BN recalibration re-estimates them.

:func:`launch_convert` is ``dsctl convert``: load, order, check the full network is unchanged (largest
difference of the logits recorded), recalibrate BN, evaluate every sub-network and write a supernet run
folder that ``train-supernet --init-from`` fine-tunes with the sandwich rule.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dsctl.errors import DsctlError
from dsctl.models.base import Supernet

__all__ = ["AUTO", "CRITERIA", "resolve_criterion", "Member", "ChannelGroup", "channel_groups", "group_importance", "order_channels",
           "ConversionReport", "launch_convert", "MAX_FULL_WIDTH_DIFF"]

logger = logging.getLogger(__name__)

CRITERIA = ("l1", "l2", "bn_scale", "taylor", "none")
"""``none``: no reordering (the first-k of the weights as trained: the comparison conversion must beat)."""
AUTO = "auto"
"""The default, chosen by measurement (results/conversion/): ``bn_scale`` where the family has BatchNorm
(it gave the most accurate sub-networks right after conversion, before any fine-tune), else ``l2`` (the
next best there)."""


def resolve_criterion(model: Supernet, criterion: str) -> str:
    """``auto`` as :data:`AUTO` says; any other name as given (checked by :func:`order_channels`)."""
    if criterion != AUTO:
        return criterion
    return "bn_scale" if getattr(model, "needs_bn_calibration", True) else "l2"
MAX_FULL_WIDTH_DIFF = 1e-4  # reordering is exact up to float summation order


@dataclass(frozen=True)
class Member:
    """One tensor of a group: along ``dim``, unit i of the group is indices ``offset + i*block ..
    offset + (i+1)*block`` (``block`` > 1 for a head, a run of ``head_dim`` channels). ``role``: ``weight``
    (scored by the magnitude and Taylor criteria), ``bn`` (a BatchNorm scale: scored by those and by
    ``bn_scale``), ``other`` (moved, not scored: biases, statistics, tokens)."""

    key: str
    dim: int
    role: str = "weight"
    offset: int = 0
    block: int = 1


@dataclass(frozen=True)
class ChannelGroup:
    """Units that move together: ``size`` units, each present in every member."""

    name: str
    size: int
    members: tuple[Member, ...]


# -- groups --------------------------------------------------------------------------------------------------
def channel_groups(model: Supernet) -> list[ChannelGroup]:
    """The model's coupled groups: its own description where the family has one (``channel_groups``
    method), else Torch-Pruning's dependency graph traced through the full network."""
    own = getattr(model, "channel_groups", None)
    if callable(own):
        return own()
    return _traced_groups(model)


def _traced_groups(model: Supernet) -> list[ChannelGroup]:
    import torch_pruning as tp

    from dsctl.layers.slim import SlimBatchNorm2d

    class _SlimBNPruner(tp.pruner.function.BasePruningFunc):  # tells the graph how SlimBatchNorm2d couples
        TARGET_MODULES = (SlimBatchNorm2d,)

        def prune_out_channels(self, layer, idxs):
            return layer

        prune_in_channels = prune_out_channels

        def get_out_channels(self, layer):
            return layer.num_features

        get_in_channels = get_out_channels

    was_training = model.training
    model.eval()
    example = torch.zeros(1, model.in_chans, model.default_input_size, model.default_input_size,
                          device=next(model.parameters()).device)
    try:
        with torch.enable_grad():  # the graph is traced through autograd
            graph = tp.DependencyGraph().build_dependency(
                model, example, forward_fn=lambda m, x: m(x), customized_pruners={SlimBatchNorm2d: _SlimBNPruner()},
                ignored_params=list(model.gate.parameters()))
    finally:
        model.train(was_training)
    names = {m: n for n, m in model.named_modules()}
    head = _classifier(model)
    groups = []
    for group in graph.get_all_groups(ignored_layers=[head]):
        members: dict[tuple[str, int], Member] = {}
        size = None
        for dep, idxs in group:
            module, fn = dep.target.module, dep.handler.__name__
            if module not in names or module is model.gate:
                continue
            for m in _module_members(names[module], module, out=fn == "prune_out_channels"):
                members.setdefault((m.key, m.dim), m)
            size = size or len(idxs)
        if members:
            root = names[group[0][0].target.module]
            groups.append(ChannelGroup(root, int(size), tuple(members.values())))
    return groups


def _classifier(model: nn.Module) -> nn.Module:
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1]


def _module_members(name: str, module: nn.Module, *, out: bool) -> list[Member]:
    from dsctl.layers.slim import SlimBatchNorm2d

    if isinstance(module, SlimBatchNorm2d):
        return [Member(f"{name}.weight", 0, "bn"), Member(f"{name}.bias", 0, "other"),
                Member(f"{name}.running_mean", 0, "other"), Member(f"{name}.running_var", 0, "other")]
    if isinstance(module, nn.Conv2d | nn.Linear):
        depthwise = isinstance(module, nn.Conv2d) and module.groups > 1
        dim = 0 if out or depthwise else 1
        found = [Member(f"{name}.weight", dim)]
        if module.bias is not None and dim == 0:
            found.append(Member(f"{name}.bias", 0, "other"))
        return found
    return []


# -- importance ---------------------------------------------------------------------------------------------
def _units(t: Tensor, m: Member, size: int) -> Tensor:
    """``t`` as (size, -1): unit i's values along the member's dim, everything else flattened."""
    part = t.narrow(m.dim, m.offset, size * m.block).movedim(m.dim, 0)
    return part.reshape(size, -1)


def group_importance(group: ChannelGroup, tensors: dict[str, Tensor], criterion: str,
                     grads: dict[str, Tensor] | None = None) -> Tensor:
    """One score per unit of ``group`` (higher: more important); see the module docstring for the criteria."""
    score = torch.zeros(group.size, dtype=torch.float64)
    for m in group.members:
        t = tensors[m.key].detach().double()
        if criterion in ("l1", "l2") and m.role in ("weight", "bn"):
            u = _units(t, m, group.size)
            score += u.abs().sum(1) if criterion == "l1" else u.pow(2).sum(1).sqrt()
        elif criterion == "bn_scale" and m.role == "bn":
            score += _units(t, m, group.size).abs().sum(1)
        elif criterion == "taylor" and m.role in ("weight", "bn"):
            if grads is None or m.key not in grads:
                raise DsctlError("the taylor criterion needs gradients (training data)")
            score += _units(t * grads[m.key].double(), m, group.size).abs().sum(1)
    return score


def _index(m: Member, perm: Tensor, length: int) -> Tensor:
    """The full index along ``m.dim`` (length ``length``) that applies the unit permutation ``perm``."""
    idx = torch.arange(length)
    span = (perm[:, None] * m.block + torch.arange(m.block)[None]).reshape(-1) + m.offset
    idx[m.offset : m.offset + span.numel()] = span
    return idx


@torch.no_grad()
def order_channels(model: Supernet, criterion: str, *, grads: dict[str, Tensor] | None = None,
                   groups: Iterable[ChannelGroup] | None = None) -> dict[str, list[int]]:
    """Permute every group of ``model`` in place, most important unit first; returns each group's order
    (``none``: nothing moves). The full network computes the same function before and after.

    Raises:
        DsctlError: an unknown criterion, or ``bn_scale`` on a family without BatchNorm.
    """
    if criterion not in CRITERIA:
        raise DsctlError(f"unknown criterion {criterion!r} (allowed: {', '.join(CRITERIA)})")
    if criterion == "none":
        return {}
    groups = list(groups if groups is not None else channel_groups(model))
    if criterion == "bn_scale" and not any(m.role == "bn" for g in groups for m in g.members):
        raise DsctlError(f"criterion 'bn_scale' ranks BatchNorm scales, and {model.model_name} has no BatchNorm "
                         f"(allowed for it: {', '.join(c for c in CRITERIA if c != 'bn_scale')})")
    state = model.state_dict(keep_vars=True)
    orders = {}
    for group in groups:
        score = group_importance(group, state, criterion, grads)
        perm = torch.argsort(score, descending=True, stable=True)
        orders[group.name] = perm.tolist()
        for m in group.members:
            t = state[m.key]
            # new storage: the eval-mode slice copies (KeptSlices) see it and are re-made
            t.data = t.data.index_select(m.dim, _index(m, perm, t.shape[m.dim]).to(t.device)).contiguous()
    from dsctl.layers.slim import SlimBatchNorm2d

    for bn in model.modules():
        if isinstance(bn, SlimBatchNorm2d):
            bn.narrow_stats_from_full()
    return orders


def taylor_gradients(model: Supernet, loader: Iterable, device: torch.device, batches: int) -> dict[str, Tensor]:
    """Gradients of the full network's cross-entropy summed over ``batches`` training batches (eval-mode
    BatchNorm: the pretrained statistics, as the network was trained)."""
    model.eval()
    model.zero_grad(set_to_none=True)
    used = 0
    for x, y in loader:
        if used >= batches:
            break
        F.cross_entropy(model(x.to(device)), y.to(device)).backward()
        used += 1
    if used == 0:
        raise DsctlError("the taylor criterion saw no training batches")
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


# -- the command ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ConversionReport:
    """What ``dsctl convert`` did: the criterion, the source, the largest |logit difference| of the full
    network before and after reordering (on validation images), and each sub-network's top-1 after BN
    recalibration ordered (the written run) and, with ``compare``, with the weights as they came
    (``top1_unordered``, the same recalibration)."""

    run_dir: str
    source: str
    criterion: str
    full_width_max_abs_diff: float
    rows: list[dict[str, Any]]
    loaded: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _max_logit_diff(a: Supernet, b: Supernet, loader: Iterable, device: torch.device, batches: int = 2) -> float:
    a.eval(), b.eval()
    worst = 0.0
    with torch.no_grad():
        for i, (x, _) in enumerate(loader):
            if i >= batches:
                break
            x = x.to(device)
            worst = max(worst, float((a(x) - b(x)).abs().max()))
    return worst


def launch_convert(recipe, source: str | Path, out: str | Path, *, criterion: str = AUTO, compare: bool = True,
                   taylor_batches: int = 8, device: str = "auto", progress=None, allow_changed: bool = False,
                   resume: bool = False) -> ConversionReport:
    """``dsctl convert``: ``source`` (see :func:`dsctl.weights.load_full_width`) into the recipe's model,
    ordered by ``criterion``, BN recalibrated, every sub-network evaluated; writes ``out`` as a supernet
    run (``final.pt``, ``subnets.csv``, ``summary.json``) plus ``conversion.json`` / ``conversion.csv``.

    Raises:
        DsctlError: an unknown criterion, or a reordering that changed the full network (a coupling the
            groups missed; nothing is written then).
        CheckpointError: ``source`` does not load into the model.
    """
    from dsctl.train.launch import build_supernet_for, check_recipe_model_fits, prepare_run
    from dsctl.train.supernet import finalize_supernet, subnet_table
    from dsctl.spec import width_label
    from dsctl.weights import load_full_width

    if criterion not in (*CRITERIA, AUTO):
        raise DsctlError(f"unknown --criterion {criterion!r} (allowed: {', '.join((AUTO, *CRITERIA))})")
    recipe = recipe.model_copy(update={"model": recipe.model.model_copy(update={"init_from": None})})
    ctx = prepare_run(recipe, out, device=device, resume=resume, allow_changed=allow_changed, progress=progress,
                      stop=None, check=lambda data: check_recipe_model_fits(recipe, data))
    model = build_supernet_for(recipe, ctx.data)
    loaded = load_full_width(model, source, ema=recipe.model.init_ema)
    logger.info("loaded %s", loaded)
    criterion = resolve_criterion(model, criterion)
    model.to(ctx.device)
    original = copy.deepcopy(model)
    grads = None
    if criterion == "taylor":
        grads = taylor_gradients(model, ctx.data.loader(seed=recipe.seed, epoch=0), ctx.device, taylor_batches)
    orders = order_channels(model, criterion, grads=grads)
    diff = _max_logit_diff(original, model, ctx.data.val, ctx.device)
    if diff > MAX_FULL_WIDTH_DIFF:
        raise DsctlError(f"reordering changed the full network (largest logit difference {diff:.2e} > "
                         f"{MAX_FULL_WIDTH_DIFF:g}): a coupling of {model.model_name} the channel groups miss")
    rows = finalize_supernet(model, ctx, recipe.supernet)
    table = [{"subnet": r.label, "width": width_label(r.width), "macs": r.macs,
              "top1_ordered": r.top1} for r in rows]
    if compare and criterion != "none":
        from dsctl.train.calibrate import recalibrate_bn

        recalibrate_bn(original, ctx.data, seed=ctx.seed, device=ctx.device, num_batches=recipe.supernet.calib_batches)
        for row, r in zip(table, subnet_table(original, ctx.data, ctx.device, input_size=ctx.data.input_size,
                                              progress=ctx.progress)):
            row["top1_unordered"] = r.top1
            row["gain"] = round(row["top1_ordered"] - r.top1, 3)
    report = ConversionReport(str(ctx.run.path), str(source), criterion, diff, table, loaded)
    if ctx.dist.main:
        ctx.run.write_json("conversion.json", {**report.to_dict(), "orders": orders})
        ctx.run.write_csv("conversion.csv", table)
        ctx.run.write_json("summary.json", {"kind": "supernet", "model": model.model_name, "converted_from": str(source),
                                            "criterion": criterion, "final": [r.to_row() for r in rows]})
    return report
