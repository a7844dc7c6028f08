"""Sub-network specs and search spaces: plain Python, no torch.

A :class:`SliceSpec` names the active channel count of every slimmable stage of a supernet (stem to
head). A :class:`SearchSpace` holds the allowed choices per stage, the K indexed sub-networks the gate
routes between, and the full network used by the sandwich rule.

Words: the **full** network (``space.full``) runs every stage at its last choice; users call it
``largest`` (``--width largest``, the ``largest`` rows of tables and CSV files), and ``space.largest()``
is the sandwich rule's name for it. The **widest** indexed sub-network is ``space.subnets[-1]`` (a
window's widest is its last member); it equals the full network only when every non-routed stage has
one choice (DS-ResNet with ``gate_after=1``), and not for DS-MobileNetV1 or DS-ViT.

Example:
    >>> space = SearchSpace(
    ...     stages=(StageSpace("stem", (16, 24), routed=False), StageSpace("s1", (32, 64), routed=True)),
    ...     subnets=(SliceSpec((16, 32)), SliceSpec((16, 64))),
    ...     full=SliceSpec((24, 64)),
    ...     gate_after="stem",
    ... )
    >>> space.ratios()
    (0.5, 1.0)
    >>> space.resolve("0.5")
    SliceSpec(widths=(16, 32))
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from dsctl.errors import SpecError

__all__ = ["SliceSpec", "StageSpace", "SearchSpace", "LARGEST", "width_label"]

LARGEST = "largest"


def width_label(width: float | None) -> float | str:
    """How a sub-network's width is shown (tables, CSV and JSON ``width`` fields): its slimming ratio, or
    ``"largest"`` for the full network outside the indexed sub-networks (``width`` None, see
    :meth:`SearchSpace.width`). ``SearchSpace.resolve`` reads either back.

    >>> width_label(0.5), width_label(None)
    (0.5, 'largest')
    """
    return LARGEST if width is None else width


@dataclass(frozen=True)
class SliceSpec:
    """Active channels per slimmable stage, stem to head; in a space that slices kernels (DS-CNN++), the
    active kernel size per stage (0 where a stage's kernel is fixed); in a space that routes a transformer's
    MLP apart from its heads, the MLP hidden units per stage (0 where the MLP follows the width). Both are
    ``()`` in every other space."""

    widths: tuple[int, ...]
    kernels: tuple[int, ...] = ()
    hidden: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))
        object.__setattr__(self, "kernels", tuple(int(k) for k in self.kernels))
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))

    def kernel(self, stage: int) -> int | None:
        """The active kernel size of stage ``stage``; None where the stage runs its stored kernel."""
        return (self.kernels[stage] or None) if self.kernels else None

    def mlp_hidden(self, stage: int) -> int | None:
        """The MLP hidden units of stage ``stage``; None where they follow the width."""
        return (self.hidden[stage] or None) if self.hidden else None

    def to_json(self) -> list[int] | dict[str, list[int]]:
        """The widths list (as files have always held it), or a dict with the kernels and/or hidden units."""
        if not (self.kernels or self.hidden):
            return list(self.widths)
        out = {"widths": list(self.widths)}
        if self.kernels:
            out["kernels"] = list(self.kernels)
        if self.hidden:
            out["hidden"] = list(self.hidden)
        return out

    @classmethod
    def from_json(cls, value) -> "SliceSpec":
        """Inverse of :meth:`to_json`."""
        if isinstance(value, dict):
            return cls(tuple(value["widths"]), tuple(value.get("kernels") or ()), tuple(value.get("hidden") or ()))
        return cls(tuple(value))


@dataclass(frozen=True)
class StageSpace:
    """The ascending channel choices of one slimmable stage; ``routed`` if the gate sets its width;
    ``kernels``: the ascending odd kernel sizes its sliceable convolutions can run at (empty: fixed);
    ``mlp_ratios``: the ascending MLP hidden-width ratios its transformer blocks can run at, hidden units =
    ``int(width * ratio)`` (empty: the MLP follows the width)."""

    name: str
    choices: tuple[int, ...]
    routed: bool = False
    kernels: tuple[int, ...] = ()
    mlp_ratios: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "choices", tuple(int(c) for c in self.choices))
        object.__setattr__(self, "kernels", tuple(int(k) for k in self.kernels))
        object.__setattr__(self, "mlp_ratios", tuple(float(r) for r in self.mlp_ratios))
        if list(self.mlp_ratios) != sorted(set(self.mlp_ratios)) or any(r <= 0 for r in self.mlp_ratios):
            raise ValueError(f"stage {self.name!r}: mlp_ratios must be ascending, unique and > 0, got {self.mlp_ratios}")
        if not self.choices or list(self.choices) != sorted(set(self.choices)):
            raise ValueError(f"stage {self.name!r}: choices must be ascending and unique, got {self.choices}")
        if list(self.kernels) != sorted(set(self.kernels)) or any(k < 1 or k % 2 == 0 for k in self.kernels):
            raise ValueError(f"stage {self.name!r}: kernels must be ascending, unique and odd, got {self.kernels}")


@dataclass(frozen=True)
class SearchSpace:
    """All widths a supernet can run at.

    Attributes:
        stages: choices per slimmable stage.
        subnets: the K indexed sub-networks (k = 0..K-1, ascending cost); the gate routes between them.
        full: the full network (every stage at its last choice; "largest" to users); may lie outside
            ``subnets``.
        gate_after: human-readable gate position (e.g. ``"s4.b0.se"``).
    """

    stages: tuple[StageSpace, ...]
    subnets: tuple[SliceSpec, ...]
    full: SliceSpec
    gate_after: str

    def __post_init__(self) -> None:
        if not any(s.routed for s in self.stages):
            raise ValueError("a search space needs at least one routed stage")
        for spec in (*self.subnets, self.full):
            self._validate(spec)
        if self.full.widths != tuple(s.choices[-1] for s in self.stages):
            raise ValueError("full must set every stage to its largest choice")
        if self.slices_kernels and self.full.kernels != tuple(s.kernels[-1] if s.kernels else 0 for s in self.stages):
            raise ValueError("full must run every kernel-sliced stage at its largest kernel")
        if self.routes_mlp and self.full.hidden != tuple(int(s.choices[-1] * s.mlp_ratios[-1]) if s.mlp_ratios else 0
                                                         for s in self.stages):
            raise ValueError("full must run every MLP-routed stage at its largest MLP ratio")

    # -- sandwich-rule members -------------------------------------------------------------------
    def largest(self) -> SliceSpec:
        """The full network (the sandwich rule's largest member; not necessarily an indexed one)."""
        return self.full

    def smallest(self) -> SliceSpec:
        """Sub-network 0."""
        return self.subnets[0]

    def sample(self, rng: random.Random) -> SliceSpec:
        """A uniformly random indexed sub-network; the caller owns ``rng``."""
        return self.subnets[rng.randrange(len(self.subnets))]

    def all_specs(self) -> tuple[SliceSpec, ...]:
        """Every indexed sub-network (k = 0..K-1), then the full network unless it is one of them: what
        BN recalibration estimates, ``subnets.csv`` lists and ``dsctl flops --all`` counts."""
        return self.subnets if self.full in self.subnets else (*self.subnets, self.full)

    # -- lookups -----------------------------------------------------------------------------------
    @property
    def num_subnets(self) -> int:
        return len(self.subnets)

    @property
    def ratio_stage(self) -> int:
        """Index of the first routed stage; its width / max defines a sub-network's slimming ratio."""
        return next(i for i, s in enumerate(self.stages) if s.routed)

    @property
    def routed_stages(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.stages if s.routed)

    @property
    def slices_kernels(self) -> bool:
        """True for a DS-CNN++ space: some stage's kernel size is a choice too."""
        return any(s.kernels for s in self.stages)

    @property
    def routes_mlp(self) -> bool:
        """True for a transformer space whose MLP hidden width is routed apart from its heads."""
        return any(s.mlp_ratios for s in self.stages)

    @property
    def routes_more_than_width(self) -> bool:
        """A kernel or MLP space: several sub-networks share a ratio, so names carry ``@kernel`` / ``@mlpR``."""
        return self.slices_kernels or self.routes_mlp

    def mlp_ratio_of(self, spec: SliceSpec) -> float | None:
        """The MLP ratio (hidden units / width) of ``spec``'s first MLP-routed stage (None elsewhere)."""
        if not spec.hidden:
            return None
        return next((h / w for s, w, h in zip(self.stages, spec.widths, spec.hidden) if s.mlp_ratios), None)

    def kernel_of(self, spec: SliceSpec) -> int | None:
        """The kernel size of ``spec``'s first kernel-sliced routed stage (None outside kernel spaces)."""
        if not spec.kernels:
            return None
        return next((k for s, k in zip(self.stages, spec.kernels) if s.kernels and s.routed), None)

    def name(self, spec: SliceSpec) -> str:
        """What a user types to get ``spec`` back from :meth:`resolve`: its slimming ratio (``0.5``), with the
        kernel size in a kernel space (``0.5@5``) or the MLP ratio where the MLP is routed apart
        (``0.75@mlp2``), or ``largest``."""
        if spec == self.full and spec not in self.subnets:
            return LARGEST
        out = f"{self.ratio(spec):g}"
        kernel, mlp = self.kernel_of(spec), self.mlp_ratio_of(spec)
        if kernel is not None:
            out += f"@{kernel}"
        if mlp is not None:
            out += f"@mlp{mlp:g}"
        return out

    def ratio(self, spec: SliceSpec) -> float:
        """Slimming ratio rho of ``spec``: channels of the first routed stage / that stage's maximum."""
        i = self.ratio_stage
        return round(spec.widths[i] / self.stages[i].choices[-1], 6)

    def width(self, spec: SliceSpec) -> float | None:
        """The slimming ratio that names an indexed sub-network; None for a spec outside them (the full
        network of DS-MobileNetV1, whose routed stages' ratio 1.0 belongs to sub-network K-1)."""
        return self.ratio(spec) if spec in self.subnets else None

    def ratios(self) -> tuple[float, ...]:
        return tuple(self.ratio(s) for s in self.subnets)

    def index(self, spec: SliceSpec) -> int:
        """Index k of an indexed sub-network; SpecError if ``spec`` is not one of them."""
        try:
            return self.subnets.index(spec)
        except ValueError:
            raise SpecError(f"{spec.widths} is not an indexed sub-network of this space") from None

    def check(self, spec: SliceSpec) -> SliceSpec:
        """Return ``spec`` if every stage width is an allowed choice; else raise SpecError."""
        self._validate(spec)
        return spec

    def resolve(self, width: str | float | int) -> SliceSpec:
        """Turn a user width into a spec.

        Accepts a slimming ratio (``0.5``; in a kernel space a ratio and a kernel size, ``0.5@5``),
        ``"largest"``/``"full"`` for the full-width network, or ``"k=3"`` / ``"#3"`` for an indexed
        sub-network. No silent rounding: a ratio that is not in the space, or that names several
        sub-networks of a kernel space, raises SpecError listing the valid names.
        """
        text = str(width).strip().lower()
        if text in (LARGEST, "full"):
            return self.full
        for prefix in ("k=", "#"):
            if text.startswith(prefix):
                try:
                    k = int(text[len(prefix):])
                except ValueError:
                    break
                if not 0 <= k < self.num_subnets:
                    raise SpecError(f"sub-network index {k} out of range (allowed: 0..{self.num_subnets - 1})")
                return self.subnets[k]
        ratio_text, *suffixes = text.split("@")
        kernel = mlp = None
        try:
            rho = float(ratio_text)
            for suffix in suffixes:
                if suffix.startswith("mlp"):
                    mlp = float(suffix[3:])
                else:
                    kernel = int(suffix)
        except ValueError:
            raise SpecError(f"width {width!r} is not a number (allowed: {self.describe_widths()})") from None
        found = [s for s in self.subnets if abs(self.ratio(s) - rho) < 1e-6
                 and (kernel is None or self.kernel_of(s) == kernel)
                 and (mlp is None or abs((self.mlp_ratio_of(s) or -1.0) - mlp) < 1e-6)]
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            what = "kernel sizes" if self.slices_kernels else "MLP ratios"
            raise SpecError(f"width {ratio_text} names {len(found)} sub-networks of different {what} "
                            f"(allowed: {self.describe_widths()})")
        shown = width if isinstance(width, (int, float)) or str(width).strip() == str(width) else repr(width)
        raise SpecError(f"width {shown} is not in the search space (allowed: {self.describe_widths()})")

    def describe_widths(self) -> str:
        names = ", ".join(self.name(s) for s in self.subnets)
        return f"{names}, or 'largest'"

    def label(self, spec: SliceSpec) -> str:
        """Short name of a spec: ``k3`` for indexed sub-networks, ``largest`` for the full network."""
        if spec in self.subnets:
            return f"k{self.subnets.index(spec)}"
        if spec == self.full:
            return LARGEST
        return "custom"

    def stage_widths(self, spec: SliceSpec) -> dict[str, int]:
        return {s.name: w for s, w in zip(self.stages, spec.widths)}

    def to_dict(self) -> dict:
        """JSON-safe description (for checkpoints, sidecars and ``dsctl models --json``)."""
        out = {
            "stages": [{"name": s.name, "choices": list(s.choices), "routed": s.routed,
                        **({"kernels": list(s.kernels)} if s.kernels else {}),
                        **({"mlp_ratios": list(s.mlp_ratios)} if s.mlp_ratios else {})} for s in self.stages],
            "subnets": [list(s.widths) for s in self.subnets],
            "full": list(self.full.widths),
            "gate_after": self.gate_after,
            "ratios": list(self.ratios()),
        }
        if self.slices_kernels:
            out["subnet_kernels"] = [list(s.kernels) for s in self.subnets]
        if self.routes_mlp:
            out["subnet_hidden"] = [list(s.hidden) for s in self.subnets]
        if self.routes_more_than_width:
            out["names"] = [self.name(s) for s in self.subnets]
        return out

    def _validate(self, spec: SliceSpec) -> None:
        if not isinstance(spec, SliceSpec):
            raise SpecError(f"expected a SliceSpec, got {type(spec).__name__}")
        if len(spec.widths) != len(self.stages):
            raise SpecError(f"spec has {len(spec.widths)} widths, the space has {len(self.stages)} stages")
        for stage, w in zip(self.stages, spec.widths):
            if w not in stage.choices:
                raise SpecError(f"stage {stage.name!r}: width {w} not allowed (allowed: {list(stage.choices)})")
        kernels = [list(st.kernels) or [0] for st in self.stages]
        hidden = [[int(w * r) for r in st.mlp_ratios] or [0] for st, w in zip(self.stages, spec.widths)]
        self._validate_axis(spec.kernels, kernels, "kernel sizes", "kernel", self.slices_kernels, "slices no kernel")
        self._validate_axis(spec.hidden, hidden, "MLP hidden widths", "MLP hidden width", self.routes_mlp,
                            "routes no MLP apart")

    def _validate_axis(self, values: tuple[int, ...], allowed: list[list[int]], plural: str, one: str,
                       routed: bool, none: str) -> None:
        """``spec.kernels`` or ``spec.hidden``: empty where the space has no such choice, else one allowed
        value per stage (0 where the stage has none)."""
        if not routed:
            if values:
                raise SpecError(f"spec has {plural} {values}, but this space {none}")
            return
        if len(values) != len(self.stages):
            raise SpecError(f"spec has {len(values)} {plural}, the space has {len(self.stages)} stages")
        for stage, v, ok in zip(self.stages, values, allowed):
            if v not in ok:
                raise SpecError(f"stage {stage.name!r}: {one} {v} not allowed (allowed: {ok})")
