"""Model families; importing this package registers their builders."""

from dsctl.models import slim_mobilenet, slim_resnet, slim_vit  # noqa: F401
from dsctl.models.base import BoundSubnet, GatePoint, Supernet, bind

__all__ = ["BoundSubnet", "GatePoint", "Supernet", "bind"]

from dsctl import timm_models as _timm_models  # noqa: E402  (after the families: it lists them)

_timm_models.install_hook()
