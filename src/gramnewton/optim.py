"""``GramGaussNewton``: the mini-batch Gram-Gauss-Newton optimizer (Algorithm 1 of the paper)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer

from .damping import GainRatioDamping, gain_ratio, loss_gain_ratio
from .distributed import Communicator, ExactGramEngine, local_direction, resolve_mode
from .engines import Closure, GramEngine
from .engines.base import closure_residuals
from .engines.select import select_engine
from .generalized import LossClosure, check_curvature, predicted_decrease
from .losses import Loss, SquaredError, get_loss
from .solve import check_damping
from .update import GramGaussNewtonStep, apply_direction, gram_gauss_newton_direction


def check_per_sample_independence(model: nn.Module) -> None:
    """Raise if ``model`` couples the samples of a batch (BatchNorm in training mode).

    GGN needs ``f(w, x_i)`` to depend on ``x_i`` alone: BatchNorm in training mode normalises
    with batch statistics, so each output depends on the whole batch.
    """
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training:
            raise ValueError(
                f"{name or 'model'} is {type(module).__name__} in training mode: its outputs depend on "
                "the whole batch, which Gram-Gauss-Newton cannot use. Put it in eval mode, or replace it "
                "with GroupNorm (gramnewton.convert_batchnorm) or use a Fixup network."
            )


class GramGaussNewton(Optimizer):
    r"""Mini-batch Gram-Gauss-Newton (Cai et al., 2019, "Gram-Gauss-Newton Method: Learning
    Overparameterized Neural Networks for Regression Problems", Algorithm 1, Eq. 11).

    Each step solves the kernel regression of the network's current neural tangent kernel on the
    mini-batch :math:`B`:

    .. math::
        w \leftarrow (1 - \mathrm{wd})\, w - J_B^\top (\lambda G_B + \alpha I)^{-1} (f(w, x_B) - y_B),
        \qquad G_B = J_B J_B^\top,

    with :math:`J_B` and :math:`f` evaluated at the weights *before* the decay.

    Symbols of Eq. 11 and their arguments:
        - :math:`w`: ``params_or_model`` (the parameters to train).
        - :math:`f(w, x_B) - y_B`: what ``closure()`` returns, per sample, unreduced,
          shape ``(b,)`` or ``(b, k)``; or the pair ``(f(w, x_B), y_B)``, whose shapes must
          match (no broadcasting; the targets are cast to the outputs' dtype).
        - :math:`J_B`: per-sample Jacobian ``(b*k, m)`` of those residuals, rows sample-major
          (row ``i*k + c`` is sample ``i``, output ``c``); never formed by the fast engine.
        - :math:`\lambda`: ``lam > 0``. :math:`\alpha`: ``alpha >= 0`` (acts as an inverse learning
          rate; the paper uses ``lam=1`` and ``alpha`` in 0.075-0.3). ``alpha=0`` with ``lam=1``
          is Eq. 10; with the whole data set in the closure it is the full-batch Eq. 9.
        - ``weight_decay`` (wd): decoupled, ``w <- (1 - wd) w`` in the same step.

    Args:
        params_or_model: an ``nn.Module`` (the fast engine then hooks it; BatchNorm in training
            mode is refused) or an iterable of parameters or parameter groups.
        lam: scale of the Gram matrix.
        alpha: Tikhonov damping added to ``lam * G``.
        weight_decay: decoupled weight decay per step, in ``[0, 1)``.
        engine: ``"auto"`` (fastest supported), ``"hooks"`` (per-layer factors, needs a model),
            ``"reference"`` (dense Jacobian, any model), ``"functional"`` (``torch.func``, fast
            and exact for a :class:`~gramnewton.engines.FunctionalResidual` closure, e.g. a
            physics-informed residual), or an engine instance.
        solve_dtype: dtype of the ``(b*k, b*k)`` solve, e.g. ``torch.float64``.
        adaptive_damping: ``True`` or a :class:`~gramnewton.damping.GainRatioDamping` to adapt
            ``alpha`` after every step by Levenberg-Marquardt's gain ratio (one extra forward
            pass without gradients per step; steps that increase the batch loss are undone).
            ``alpha`` in ``param_groups`` then holds the current value. Default: fixed ``alpha``.
        loss: ``"mse"`` (Eq. 11; the closure returns residuals ``f - y``), ``"cross_entropy"``,
            ``"binary_cross_entropy"`` or a :class:`~gramnewton.losses.Loss` instance. For a loss
            other than ``"mse"`` the closure returns ``(outputs, targets)`` (for cross-entropy
            ``(logits (b, k), labels (b,))`` int64, or probabilities ``(b, k)``) and the step is the
            damped generalized Gauss-Newton step of the summed loss ``sum_i l_i``,
            ``w <- (1 - wd) w - (lam J^T H J + alpha I)^{-1} J^T g``, solved in sample space
            (:mod:`gramnewton.generalized`); the gain ratio of adaptive damping then compares
            loss decreases.
        curvature: output-Hessian estimate for a loss other than ``"mse"``: ``"exact"`` (``k``
            backward passes, a ``(b*k, b*k)`` Gram), ``"top_c"`` (``top_c + 1`` passes) or
            ``"gradient"`` (one pass, ``(b, b)``); see :mod:`gramnewton.generalized`.
        top_c: number of output coordinates kept exactly by ``curvature="top_c"``.
        distributed: data parallelism over ``torch.distributed`` (:mod:`gramnewton.distributed`),
            each rank's closure returning its own shard's residuals (or outputs and targets):
            ``"exact"`` (the step of the union of all ranks' batches, to round-off),
            ``"local"`` (each rank solves its own system, the steps are averaged: DDP's
            communication), ``"auto"`` (exact when ``torch.distributed`` is initialised with
            more than one process, else off) or ``None`` (off). Rank 0's parameters (and the
            model's buffers) are broadcast to every rank at construction. The model may be a
            plain module (recommended) or a ``DistributedDataParallel`` wrapper, whose forward
            passes then run under ``no_sync()`` (GGN never reads ``.grad``, so DDP's gradient
            all-reduce would be wasted). The returned loss is the union batch's.
        process_group: the ranks to span (default: the whole world).

    ``lam`` and ``alpha`` live in ``param_groups`` and must agree across groups (one system is
    solved for all parameters); ``weight_decay`` may differ per group.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 64), nn.Tanh(), nn.Linear(64, 1))
        >>> opt = GramGaussNewton(model, lam=1.0, alpha=0.1)
        >>> x, y = torch.randn(32, 4), torch.randn(32)
        >>> loss = opt.step(lambda: model(x).squeeze(1) - y)
    """

    def __init__(
        self,
        params_or_model: nn.Module | Iterable[Tensor] | Iterable[dict[str, Any]],
        *,
        lam: float = 1.0,
        alpha: float = 0.1,
        weight_decay: float = 0.0,
        engine: str | GramEngine = "auto",
        solve_dtype: torch.dtype | None = None,
        adaptive_damping: bool | GainRatioDamping = False,
        loss: str | Loss = "mse",
        curvature: str = "exact",
        top_c: int = 1,
        distributed: str | None = "auto",
        process_group: dist.ProcessGroup | None = None,
    ):
        _check_hyper(lam, alpha, weight_decay)
        self.distributed = resolve_mode(distributed, process_group)
        self.loss = get_loss(loss)
        check_curvature(curvature, top_c)
        if isinstance(self.loss, SquaredError) and curvature != "exact":
            raise ValueError("curvature estimates apply to losses other than 'mse' (its output Hessian is I)")
        self.curvature, self.top_c = curvature, top_c
        self.model = params_or_model if isinstance(params_or_model, nn.Module) else None
        params = self.model.parameters() if self.model is not None else params_or_model
        super().__init__(params, dict(lam=lam, alpha=alpha, weight_decay=weight_decay))
        for group in self.param_groups:
            _check_hyper(group["lam"], group["alpha"], group["weight_decay"])
        trainable = [p for g in self.param_groups for p in g["params"] if p.requires_grad]
        if not trainable:
            raise ValueError("GramGaussNewton got no parameter that requires grad")
        module = self.model.module if isinstance(self.model, DistributedDataParallel) else self.model
        self.engine = select_engine(trainable, module, engine)
        self.solve_dtype = solve_dtype
        self.damping = GainRatioDamping() if adaptive_damping is True else (adaptive_damping or None)
        self.communicator: Communicator | None = None
        if self.distributed is not None:
            if self.distributed == "local" and self.damping is not None:
                raise ValueError("adaptive_damping needs distributed='exact' (local steps have no common gain ratio)")
            self.communicator = Communicator(process_group)
            # as DDP does: every rank starts from rank 0's parameters and buffers (e.g. fixed random layers)
            self.communicator.broadcast_(trainable + (list(self.model.buffers()) if self.model is not None else []))
            if self.distributed == "exact":
                self.engine = ExactGramEngine(self.engine, self.communicator)
        self.last_step: GramGaussNewtonStep | None = None
        self.last_gain_ratio: float | None = None

    def _shared(self, key: str) -> float:
        values = {group[key] for group in self.param_groups}
        if len(values) != 1:
            raise ValueError(f"{key} must be the same in every param group (one system is solved), got {values}")
        return values.pop()

    def step(self, closure: Closure) -> Tensor:  # type: ignore[override]
        """Take one step on the mini-batch whose residuals ``closure()`` returns.

        With ``loss="mse"`` ``closure()`` returns the residuals ``(b,)`` or ``(b, k)``; with
        another loss it returns ``(outputs, targets)``.

        Returns:
            The batch's mean loss before the update (detached scalar): for ``"mse"`` the mean of
            the squared residuals, else the mean of ``l_i``.

        Raises:
            ValueError: bad hyper-parameters, bad residuals (shape, broadcast, dtype, NaN/Inf, no
                dependence on the parameters) or a batch-coupling module; nothing is changed.
            SingularGramError: no finite step (the loss, Gram matrix, coefficients or direction
                overflows); nothing is changed.
            Any error of the closure's re-evaluation (adaptive damping) restores the
            parameters and the state before it propagates.
        """
        if closure is None:
            raise ValueError("GramGaussNewton.step needs a closure that returns per-sample residuals")
        for group in self.param_groups:
            _check_hyper(group["lam"], group["alpha"], group["weight_decay"])
        if self.model is not None:
            check_per_sample_independence(self.model)
        closure = self._without_ddp_sync(closure)
        general = (
            None if isinstance(self.loss, SquaredError) else LossClosure(self.loss, closure, self.curvature, self.top_c)
        )
        hyper = dict(lam=self._shared("lam"), alpha=self._shared("alpha"), solve_dtype=self.solve_dtype)
        if self.distributed == "local":
            losses = (lambda s: s.residuals.pow(2)) if general is None else (lambda s: general.per_sample)
            result, loss = local_direction(self.engine, general or closure, self.communicator, losses=losses, **hyper)
            if general is not None:  # this rank's own batch, as the single-process step records it
                result = replace(result, mean_loss=general.per_sample.mean())
        else:
            result = gram_gauss_newton_direction(self.engine, general or closure, **hyper)
            if general is not None:
                total = self._total(lambda: (general.per_sample.double().sum(), general.per_sample.numel()), 2)
                result = replace(result, mean_loss=(total[0] / total[1]).to(general.per_sample.dtype))
            loss = result.loss
        backup = [p.detach().clone() for p in self.engine.params] if self.damping else None
        steps = {p: self.state[p].get("step") for p in self.engine.params} if self.damping else {}
        updates = {id(p): d for p, d in zip(self.engine.params, result.direction)}
        for group in self.param_groups:
            params = [p for p in group["params"] if id(p) in updates]
            apply_direction(params, [updates[id(p)] for p in params], group["weight_decay"])
            for p in params:
                state = self.state[p]
                state["step"] = state.get("step", torch.tensor(0.0)) + 1
        if self.damping is not None:
            try:
                self._adapt_damping(closure, result, backup, general)
            except BaseException:  # the re-evaluation failed: undo the step and its bookkeeping
                self._restore(backup, steps)
                raise
        self.last_step = result
        return loss

    def _without_ddp_sync(self, closure: Closure) -> Closure:
        """``closure`` run under DDP's ``no_sync()``: no gradient all-reduce is prepared."""
        if not isinstance(self.model, DistributedDataParallel):
            return closure
        model = self.model

        def unsynced() -> Any:
            with model.no_sync():
                return closure()

        return unsynced

    def _total(self, fn: Callable[[], tuple[float, ...]], width: int) -> Tensor:
        """``fn()`` summed over the ranks in exact mode (errors raised on every rank), else as is."""
        if self.distributed == "exact":
            return self.communicator.total(fn, width)
        return torch.tensor([float(v) for v in fn()], dtype=torch.float64)

    @torch.no_grad()
    def _restore(self, backup: list[Tensor], steps: dict[Tensor, Tensor | None]) -> None:
        for p, old in zip(self.engine.params, backup):
            p.copy_(old)
        for p, step in steps.items():
            if step is None:
                self.state[p].pop("step", None)
                if not self.state[p]:
                    del self.state[p]
            else:
                self.state[p]["step"] = step

    @torch.no_grad()
    def _adapt_damping(
        self, closure: Closure, result: GramGaussNewtonStep, backup: list[Tensor], general: LossClosure | None
    ) -> None:
        """Gain ratio on the same batch; new ``alpha``; undo the step if it made things worse."""
        if general is not None:
            before = float(self._total(lambda: (general.per_sample.double().sum(),), 1))
            predicted_loss = predicted_decrease(result.residuals, result.gram, result.coefficients)
            rho = loss_gain_ratio(before, float(self._total(lambda: (general.loss_sum(),), 1)), predicted_loss)
        else:
            if self.distributed == "exact":  # the union batch's residuals, in rank order
                new_residuals = self.communicator.gather(lambda: closure_residuals(closure()).reshape(-1))
            else:
                new_residuals = closure_residuals(closure())
            if not isinstance(new_residuals, Tensor) or new_residuals.numel() != result.residuals.numel():
                raise ValueError("closure returned residuals of a different shape when re-evaluated")
            r = result.residuals.reshape(-1)
            predicted = r - result.gram.to(r.dtype) @ result.coefficients.to(r.dtype)
            rho = gain_ratio(r, predicted, new_residuals.reshape(-1))
        self.last_gain_ratio = rho
        alpha = self.damping.next_alpha(self._shared("alpha"), rho)
        for group in self.param_groups:
            group["alpha"] = alpha
        if rho < self.damping.reject_below:
            for p, old in zip(self.engine.params, backup):
                p.copy_(old)


def _check_hyper(lam: float, alpha: float, weight_decay: float) -> None:
    check_damping(lam, alpha)
    if not 0 <= weight_decay < 1:
        raise ValueError(f"Invalid weight_decay value: {weight_decay} (must be in [0, 1))")
