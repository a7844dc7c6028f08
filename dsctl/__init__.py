"""dsctl: dynamic weight slicing (DS-Net / DS-Net++) for CNNs and vision transformers."""

from dsctl.errors import CheckpointError, DataError, DsctlError, RecipeError, SpecError
from dsctl.models import BoundSubnet, Supernet, bind
from dsctl.registry import build_model, list_models, register_model
from dsctl.spec import SearchSpace, SliceSpec, StageSpace

__version__ = "0.1.0"

__all__ = [
    "BoundSubnet", "CheckpointError", "DataError", "DsctlError", "RecipeError", "SearchSpace", "SliceSpec",
    "SpecError", "StageSpace", "Supernet", "bind", "build_model", "list_models", "register_model",
]
