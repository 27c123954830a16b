"""Convergence studies of the wide two-layer network: Theorem 1 (quadratic rate) and Theorem 2 (rho(A))."""

from .closed_form import TwoLayerEngine, make_engine
from .data import sphere_data
from .gauss_seidel import SgdRate, best_sgd_rate, block_split, iteration_matrix, sgd_epoch_matrix, spectral_radius
from .minibatch import MinibatchRun, MinibatchStudy, minibatch_run, tail_contraction
from .ntk import least_eigenvalue, ntk_limit
from .quadratic import QuadraticRow, QuadraticRun, QuadraticStudy, quadratic_run, seeded_two_layer
from .runs import FullBatchTrace, ggn_batch_step, run_epochs, run_full_batch, sgd_batch_step

__all__ = [
    "FullBatchTrace",
    "MinibatchRun",
    "MinibatchStudy",
    "QuadraticRow",
    "QuadraticRun",
    "QuadraticStudy",
    "SgdRate",
    "TwoLayerEngine",
    "best_sgd_rate",
    "block_split",
    "ggn_batch_step",
    "iteration_matrix",
    "least_eigenvalue",
    "make_engine",
    "minibatch_run",
    "ntk_limit",
    "quadratic_run",
    "run_epochs",
    "run_full_batch",
    "seeded_two_layer",
    "sgd_batch_step",
    "sgd_epoch_matrix",
    "spectral_radius",
    "sphere_data",
    "tail_contraction",
]
