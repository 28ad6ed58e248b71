"""Loss-weighting and gradient-combination strategies, registered by their config names."""

from .base import GradientStrategy, WeightingStrategy
from .dwa import DWA
from .famo import FAMO
from .gradnorm import GradNorm
from .mgda import MGDA
from .pcgrad import PCGrad
from .registry import (
    GRADIENTS,
    WEIGHTINGS,
    build_gradient,
    build_weighting,
    register_gradient,
    register_weighting,
)
from .rlw import RLW
from .static import Static
from .sum import Sum
from .uncertainty import Uncertainty
from .upgrad import UPGrad

register_weighting("sum", Sum)
register_weighting("static", Static)
register_weighting("uncertainty", Uncertainty)
register_weighting("dwa", DWA)
register_weighting("rlw", RLW)
register_weighting("gradnorm", GradNorm)
register_weighting("famo", FAMO)

register_gradient("none", GradientStrategy)
register_gradient("pcgrad", PCGrad)
register_gradient("mgda", MGDA)
register_gradient("upgrad", UPGrad)

__all__ = [
    "DWA",
    "FAMO",
    "GRADIENTS",
    "MGDA",
    "RLW",
    "WEIGHTINGS",
    "GradNorm",
    "GradientStrategy",
    "PCGrad",
    "Static",
    "Sum",
    "UPGrad",
    "Uncertainty",
    "WeightingStrategy",
    "build_gradient",
    "build_weighting",
    "register_gradient",
    "register_weighting",
]
