"""Width-sliceable layers.

Every layer stores one dense weight at its largest width. A call slices the **first** channels: the
input tensor says how many input channels are active, the caller says how many outputs to produce, and
no width survives the call (DESIGN.md section 1). Each layer has ``to_static`` returning the plain
``torch.nn`` layer that computes the same function at a fixed width.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dsctl.layers.static import SqueezeExcite, pointwise

__all__ = ["KeptSlices", "SlimConv2d", "SlimLinear", "SlimBatchNorm2d", "SlimSqueezeExcite"]


class KeptSlices(nn.Module):
    """Mixin for a layer whose weight is sliced per call: contiguous copies of its slices, kept per width
    in eval mode outside autograd.

    A strided slice such as ``weight[:out, :in]`` (or DS-ViT's head-aware q/k/v rows) makes the kernels
    copy it on every call, which made sliced sub-networks slower than their exported twins (issue 11).
    :meth:`kept` returns a copy made once per key instead, when nothing can differentiate through it (no
    grad, or a frozen weight), the layer is in eval mode and nobody traces or compiles. The copies are
    dropped when ``weight`` or ``bias`` changes (in-place update, new storage: checked on every call), on
    ``.to()`` and friends, ``load_state_dict`` and ``train()``; at most one per key used since then is held.
    """

    weight: Tensor
    bias: Tensor | None

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._slices: dict[object, object] = {}
        self._slices_stamp: tuple[int, ...] | None = None

    def kept(self, key: object, make):
        """``make()`` (a tensor or a tuple of them), kept under ``key`` while the weights stay as they are;
        ``make()`` itself, a view autograd sees, whenever keeping is not safe (see the class docstring).

        Called once per layer per forward, so it reads the parameters from ``_parameters`` directly:
        ``nn.Module.__getattr__`` costs about a microsecond a name, a quarter of the whole lookup, and at
        batch 1 every microsecond between two operators lets the intra-op threads fall asleep (issue 11).
        """
        params = self._parameters
        if "weight" not in params or "bias" not in params:  # parametrized (weight_norm, ...): not ours to keep
            return make()
        w, b = params["weight"], params["bias"]
        if (self.training or (w.requires_grad and torch.is_grad_enabled()) or w.is_inference()
                or torch.jit.is_tracing() or torch.compiler.is_compiling()):
            return make()
        stamp = (w.data_ptr(), w._version) if b is None else (w.data_ptr(), w._version, b.data_ptr(), b._version)
        if stamp != self._slices_stamp:
            self._slices.clear()
            self._slices_stamp = stamp
        out = self._slices.get(key)
        if out is None:
            with torch.inference_mode(False), torch.no_grad():
                made = make()
                out = self._slices[key] = (tuple(t if t is None else t.contiguous() for t in made)
                                           if isinstance(made, tuple) else made.contiguous())
        return out

    def _first(self, rows: int, cols: int) -> tuple[Tensor, Tensor | None]:
        """Views of ``weight[:rows, :cols]`` and ``bias[:rows]`` (what a conv or linear layer keeps)."""
        w, b = self.weight, self.bias
        return w[:rows, :cols], None if b is None else b[:rows]

    def train(self, mode: bool = True):
        if mode:  # training changes the weight: free the copies now (eval() keeps them; the stamp checks them)
            self._slices.clear()
        return super().train(mode)

    def _apply(self, fn, recurse: bool = True):  # .to(), .half(), .cuda(): new storage, drop the copies
        self._slices.clear()
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self._slices.clear()
        super()._load_from_state_dict(*args, **kwargs)


class SlimConv2d(KeptSlices, nn.Conv2d):
    """Conv2d whose weight is sliced to ``[:out_channels, :in_channels]`` per call, and optionally to the
    centre ``k x k`` of its stored ``K x K`` kernel (DS-CNN++'s kernel-size slicing).

    A depthwise conv (``groups == in_channels == out_channels``) is sliced to ``weight[:c]`` with
    ``groups = c``, where ``c`` is the number of input channels; its output width always equals ``c``.
    Only ``groups == 1`` and depthwise convs are supported. A smaller kernel ``k`` (odd, like ``K``) runs
    with its padding reduced by ``(K - k) / 2``, so the output size is the stored kernel's. A slice that
    cuts the input channels or the kernel is kept contiguous in eval mode (:class:`KeptSlices`).
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.depthwise = self.groups > 1 and self.groups == self.in_channels == self.out_channels
        # a 1x1 conv without padding maps (N, C, 1, 1) vectors to (N, O, 1, 1): a matrix product (pointwise)
        self.on_vectors = self.kernel_size == (1, 1) and self.padding == (0, 0) and self.groups == 1
        if self.groups != 1 and not self.depthwise:
            raise ValueError(f"SlimConv2d supports groups=1 or depthwise, got groups={self.groups}")

    def forward(self, x: Tensor, out_channels: int | None = None, kernel: int | None = None) -> Tensor:  # type: ignore[override]
        in_c = x.shape[1]
        if self.depthwise:
            out_c, groups = in_c, in_c
        else:
            out_c = self.out_channels if out_channels is None else out_channels
            groups = 1
        weight, bias = self.sliced(out_c, in_c, kernel)
        if self.on_vectors and x.shape[-1] == 1 and x.shape[-2] == 1:  # an SE's or the gate's pooled input
            return pointwise(x, weight, bias)
        return F.conv2d(x, weight, bias, self.stride, self.kernel_padding(kernel), self.dilation, groups)

    def kernel_padding(self, kernel: int | None) -> tuple[int, ...]:
        """The padding at active kernel size ``kernel`` (None: the stored one) that keeps the output size."""
        if kernel is None or kernel == self.kernel_size[0]:
            return self.padding
        big = self.kernel_size[0]
        if not (0 < kernel <= big and (big - kernel) % 2 == 0 and self.kernel_size[0] == self.kernel_size[1]):
            raise ValueError(f"SlimConv2d with a {big}x{self.kernel_size[1]} kernel cannot run a {kernel}x{kernel} "
                             f"centre (allowed: odd sizes up to {big} of a square kernel)")
        return tuple(p - (big - kernel) // 2 * d for p, d in zip(self.padding, self.dilation))

    def sliced(self, out_channels: int, in_channels: int,
               kernel: int | None = None) -> tuple[Tensor, Tensor | None]:
        """``weight[:out_channels, :in_channels]`` (depthwise: ``weight[:out_channels]``), cropped to the centre
        ``kernel x kernel``, and ``bias[:out_channels]``: the whole tensors at full width and kernel, else kept
        in eval mode outside autograd (the weight contiguous, see :class:`KeptSlices`; views where slicing
        copies nothing)."""
        in_w = 1 if self.depthwise else in_channels
        big = self.kernel_size[0]
        if kernel is None or kernel == big:
            if out_channels == self.out_channels and in_w == self.in_channels // self.groups:
                return self.weight, self.bias
            return self.kept((out_channels, in_w), lambda: self._first(out_channels, in_w))
        lo = (big - kernel) // 2

        def make() -> tuple[Tensor, Tensor | None]:
            self.kernel_padding(kernel)  # checks the size (once per kept slice in eval mode)
            w, b = self._first(out_channels, in_w)
            return w[:, :, lo : lo + kernel, lo : lo + kernel], b

        return self.kept((out_channels, in_w, kernel), make)

    def sliced_weight(self, out_channels: int, in_channels: int, kernel: int | None = None) -> Tensor:
        """The weight of :meth:`sliced`."""
        return self.sliced(out_channels, in_channels, kernel)[0]

    @torch.no_grad()
    def to_static(self, in_channels: int, out_channels: int | None = None, kernel: int | None = None) -> nn.Conv2d:
        """A plain ``nn.Conv2d`` holding copies of the sliced weights (at the centre ``kernel x kernel``)."""
        if self.depthwise:
            out_channels, groups = in_channels, in_channels
        else:
            out_channels = self.out_channels if out_channels is None else out_channels
            groups = 1
        weight = self.sliced_weight(out_channels, in_channels, kernel)
        size = self.kernel_size if kernel is None else (kernel, kernel)
        conv = nn.Conv2d(
            in_channels, out_channels, size, self.stride, self.kernel_padding(kernel), self.dilation, groups,
            bias=self.bias is not None, device=self.weight.device, dtype=self.weight.dtype,
        )
        conv.weight.copy_(weight)
        if self.bias is not None:
            conv.bias.copy_(self.bias[:out_channels])
        return conv


class SlimLinear(KeptSlices, nn.Linear):
    """Linear layer sliced to ``weight[:out_features, :x.shape[-1]]`` per call (a slice that cuts the input
    features is kept contiguous in eval mode: :class:`KeptSlices`)."""

    def forward(self, x: Tensor, out_features: int | None = None) -> Tensor:  # type: ignore[override]
        out_f = self.out_features if out_features is None else out_features
        in_f = x.shape[-1]
        if out_f == self.out_features and in_f == self.in_features:
            return F.linear(x, self.weight, self.bias)
        weight, bias = self.kept((out_f, in_f), lambda: self._first(out_f, in_f))
        return F.linear(x, weight, bias)

    @torch.no_grad()
    def to_static(self, in_features: int, out_features: int | None = None) -> nn.Linear:
        out_features = self.out_features if out_features is None else out_features
        lin = nn.Linear(in_features, out_features, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        lin.weight.copy_(self.weight[:out_features, :in_features])
        if self.bias is not None:
            lin.bias.copy_(self.bias[:out_features])
        return lin


class SlimBatchNorm2d(KeptSlices, nn.Module):
    """BatchNorm with private running statistics per width choice (and per kernel size, after a kernel-sliced
    convolution) and one shared, sliced affine.

    The statistics are picked from ``x.shape[1]`` and the ``kernel`` argument (one of ``kernels``; None: the
    largest). The largest width at the largest kernel uses the standard buffer names (``running_mean``,
    ``running_var``, ``num_batches_tracked``) so a full-width state dict of a plain network loads into it;
    smaller widths use ``running_mean_c{c}``, smaller kernels add ``_k{k}`` (``running_mean_c{c}_k{k}``, or
    ``running_mean_k{k}`` at full width), and so on.

    Setting ``momentum = None`` gives a cumulative average (used by BN recalibration).
    """

    def __init__(self, choices: Sequence[int], eps: float = 1e-5, momentum: float | None = 0.1,
                 kernels: Sequence[int] = ()) -> None:
        super().__init__()
        self.choices = tuple(sorted(set(int(c) for c in choices)))
        self.kernels = tuple(sorted(set(int(k) for k in kernels)))
        self.num_features = self.choices[-1]
        self.eps = eps
        self.momentum = momentum
        self.sync = False  # SyncBatchNorm behaviour under torch.distributed (set by the trainer)
        self.weight = nn.Parameter(torch.ones(self.num_features))
        self.bias = nn.Parameter(torch.zeros(self.num_features))
        # (width, kernel or None for the largest) -> its three buffer names
        self._stat_names: dict[tuple[int, int | None], tuple[str, str, str]] = {}
        for k in (*self.kernels[:-1], None):
            for c in self.choices:
                suffix = ("" if c == self.num_features else f"_c{c}") + ("" if k is None else f"_k{k}")
                names = ("running_mean" + suffix, "running_var" + suffix, "num_batches_tracked" + suffix)
                self._stat_names[c, k] = names
                self.register_buffer(names[0], torch.zeros(c))
                self.register_buffer(names[1], torch.ones(c))
                self.register_buffer(names[2], torch.tensor(0, dtype=torch.long))

    def stats(self, c: int, kernel: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """(running_mean, running_var, num_batches_tracked) of width ``c`` after kernel size ``kernel``."""
        if kernel is not None and self.kernels and kernel == self.kernels[-1]:
            kernel = None
        names = self._stat_names.get((c, kernel))
        if names is None:
            if kernel is not None:
                raise ValueError(f"SlimBatchNorm2d got kernel {kernel} (allowed: {list(self.kernels) or 'none'})")
            raise ValueError(f"SlimBatchNorm2d got {c} channels (allowed: {list(self.choices)})")
        buffers = self._buffers  # read per call: .to() and load_state_dict may replace the tensors
        return buffers[names[0]], buffers[names[1]], buffers[names[2]]

    @torch.no_grad()
    def reset_running_stats(self) -> None:
        for c, k in self._stat_names:
            mean, var, n = self.stats(c, k)
            mean.zero_()
            var.fill_(1.0)
            n.zero_()

    @torch.no_grad()
    def narrow_stats_from_full(self, keep: Sequence[int] = ()) -> None:
        """Every other choice's statistics (but the widths in ``keep`` at the largest kernel) set to the full
        width's first channels at the largest kernel: the start after full-width weights are loaded or
        reordered, which BN recalibration refines."""
        full_mean, full_var, full_n = self.stats(self.num_features)
        for c, k in self._stat_names:
            if (c == self.num_features or c in keep) and k is None:
                continue
            mean, var, n = self.stats(c, k)
            mean.copy_(full_mean[:c])
            var.copy_(full_var[:c])
            n.copy_(full_n)

    def forward(self, x: Tensor, kernel: int | None = None) -> Tensor:
        c = x.shape[1]
        mean, var, n = self.stats(c, kernel)
        if self.training and self.sync and torch.distributed.is_available() and torch.distributed.is_initialized():
            return self._forward_synced(x, mean, var, n)
        factor = 0.0
        if self.training:
            n.add_(1)
            factor = 1.0 / float(n) if self.momentum is None else self.momentum
        if c == self.num_features:
            weight, bias = self.weight, self.bias
        else:  # views (nothing to copy), kept in eval mode: slicing costs more than the lookup at batch 1
            weight, bias = self.kept(c, lambda: (self.weight[:c], self.bias[:c]))
        return F.batch_norm(x, mean, var, weight, bias, self.training, factor, self.eps)

    def _forward_synced(self, x: Tensor, mean: Tensor, var: Tensor, n: Tensor) -> Tensor:
        """Batch statistics over every rank's batch (differentiable all-reduce), as SyncBatchNorm does."""
        from torch.distributed.nn.functional import all_reduce

        c = x.shape[1]
        xf = x.float()  # statistics in float32 under autocast
        local = torch.cat([xf.sum((0, 2, 3)), (xf * xf).sum((0, 2, 3)), xf.new_tensor([x.numel() / c])])
        total = all_reduce(local)
        count = total[-1]
        mu = total[:c] / count
        var_b = (total[c : 2 * c] / count - mu * mu).clamp_min(0)
        with torch.no_grad():
            n.add_(1)
            factor = 1.0 / float(n) if self.momentum is None else self.momentum
            mean.mul_(1 - factor).add_(mu.detach(), alpha=factor)
            var.mul_(1 - factor).add_(var_b.detach() * count / (count - 1).clamp_min(1), alpha=factor)
        scale = self.weight[:c] * torch.rsqrt(var_b + self.eps)
        y = (xf - mu[None, :, None, None]) * scale[None, :, None, None] + self.bias[:c][None, :, None, None]
        return y.to(x.dtype)

    @torch.no_grad()
    def to_static(self, channels: int, kernel: int | None = None) -> nn.BatchNorm2d:
        mean, var, n = self.stats(channels, kernel)
        bn = nn.BatchNorm2d(channels, eps=self.eps, device=self.weight.device, dtype=self.weight.dtype)
        bn.weight.copy_(self.weight[:channels])
        bn.bias.copy_(self.bias[:channels])
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(var)
        bn.num_batches_tracked.copy_(n)
        return bn.train(self.training)

    def extra_repr(self) -> str:
        kernels = f", kernels={list(self.kernels)}" if self.kernels else ""
        return f"choices={list(self.choices)}{kernels}, eps={self.eps}, momentum={self.momentum}"


class SlimSqueezeExcite(nn.Module):
    """Squeeze-and-excitation over a sliced input: pool -> 1x1 reduce -> ReLU -> 1x1 expand -> sigmoid.

    The reduce width is fixed (DESIGN.md: round(0.25 x the block's maximum input channels)); the reduce
    conv reads the active input channels and the expand conv produces exactly that many gates.
    """

    def __init__(self, channels: int, reduce_channels: int) -> None:
        super().__init__()
        self.reduce = SlimConv2d(channels, reduce_channels, 1, bias=True)
        self.expand = SlimConv2d(reduce_channels, channels, 1, bias=True)

    def encode(self, x: Tensor) -> Tensor:
        """Shared encoder e = ReLU(W_r pool(x) + b_r), shape (N, reduce, 1, 1)."""
        return F.relu(self.reduce(x.mean((2, 3), keepdim=True)))

    def excite(self, x: Tensor, e: Tensor) -> Tensor:
        return x * torch.sigmoid(self.expand(e, x.shape[1]))

    def forward(self, x: Tensor) -> Tensor:
        return self.excite(x, self.encode(x))

    def to_static(self, channels: int) -> nn.Module:
        return SqueezeExcite(self.reduce.to_static(channels), self.expand.to_static(self.reduce.out_channels, channels))
