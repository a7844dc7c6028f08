"""Width-sliceable layers, the width gate, and the plain modules of exported sub-networks."""

from dsctl.layers.gate import SlimGate, gumbel_one_hot, window_mask
from dsctl.layers.slim import SlimBatchNorm2d, SlimConv2d, SlimLinear, SlimSqueezeExcite

__all__ = ["SlimBatchNorm2d", "SlimConv2d", "SlimGate", "SlimLinear", "SlimSqueezeExcite", "gumbel_one_hot", "window_mask"]
