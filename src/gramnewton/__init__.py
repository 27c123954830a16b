"""gramnewton: the Gram-Gauss-Newton method for training neural networks (regression, and
classification through the generalized Gauss-Newton step of :mod:`gramnewton.generalized`)."""

from .convert import convert_batchnorm
from .damping import GainRatioDamping
from .engines import GramEngine, GramSystem, HooksEngine, ReferenceEngine
from .losses import BinaryCrossEntropy, CrossEntropy, Loss, SquaredError
from .optim import GramGaussNewton, check_per_sample_independence
from .solve import SingularGramError, SolveInfo, damped_solve
from .update import GramGaussNewtonStep, apply_direction, full_batch_step, gram_gauss_newton_direction

__all__ = [
    "BinaryCrossEntropy",
    "CrossEntropy",
    "GainRatioDamping",
    "GramEngine",
    "GramGaussNewton",
    "GramGaussNewtonStep",
    "GramSystem",
    "HooksEngine",
    "Loss",
    "ReferenceEngine",
    "SingularGramError",
    "SolveInfo",
    "SquaredError",
    "apply_direction",
    "check_per_sample_independence",
    "convert_batchnorm",
    "damped_solve",
    "full_batch_step",
    "gram_gauss_newton_direction",
]
