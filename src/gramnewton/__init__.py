"""gramnewton: the Gram-Gauss-Newton method for training neural networks (regression, and
classification through the generalized Gauss-Newton step of :mod:`gramnewton.generalized`)."""

from .allocator import AllocatorTuning, tune_allocator
from .convert import convert_batchnorm
from .damping import DampingDecision, DampingRule, GainRatioDamping
from .diagnostics import StepDiagnostics
from .engines import (
    FunctionalEngine,
    FunctionalResidual,
    GramEngine,
    GramSystem,
    HooksEngine,
    ReferenceEngine,
    Term,
    register_engine,
    register_handler,
)
from .losses import BinaryCrossEntropy, CrossEntropy, Loss, SquaredError
from .metric import SecondMomentMetric
from .optim import GramGaussNewton, check_per_sample_independence
from .solve import NonFiniteError, SingularGramError, SolveInfo, damped_solve
from .update import (
    GeodesicAcceleration,
    GramGaussNewtonStep,
    apply_direction,
    full_batch_step,
    gram_gauss_newton_direction,
)

__all__ = [
    "AllocatorTuning",
    "BinaryCrossEntropy",
    "CrossEntropy",
    "DampingDecision",
    "DampingRule",
    "FunctionalEngine",
    "FunctionalResidual",
    "GainRatioDamping",
    "GeodesicAcceleration",
    "GramEngine",
    "GramGaussNewton",
    "GramGaussNewtonStep",
    "GramSystem",
    "HooksEngine",
    "Loss",
    "NonFiniteError",
    "ReferenceEngine",
    "SecondMomentMetric",
    "SingularGramError",
    "SolveInfo",
    "SquaredError",
    "StepDiagnostics",
    "Term",
    "apply_direction",
    "check_per_sample_independence",
    "convert_batchnorm",
    "damped_solve",
    "full_batch_step",
    "gram_gauss_newton_direction",
    "register_engine",
    "register_handler",
    "tune_allocator",
]
