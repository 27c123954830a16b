"""``GramGaussNewton``: the mini-batch Gram-Gauss-Newton optimizer (Algorithm 1 of the paper)."""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import math
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import replace
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer

from .damping import DampingRule, GainRatioDamping, check_subset, damping_rule, loss_gain_ratio, squared_sums
from .diagnostics import StepDiagnostics
from .distributed import Communicator, ExactGramEngine, local_direction, resolve_mode
from .engines import Closure, GramEngine, GramSystem
from .engines.base import params_dtype, reevaluated_residuals, replayable_randomness
from .engines.reference import flatten, split_like
from .engines.select import called_modules, select_engine
from .generalized import LossClosure, check_curvature, predicted_decrease, resolve_curvature
from .losses import Loss, SquaredError, get_loss
from .metric import SecondMomentMetric, batch_gradient, metric_from, metric_system
from .solve import check_damping, check_solve_dtype, is_number
from .update import (
    SOLVE_SPACES,
    GeodesicAcceleration,
    GramGaussNewtonStep,
    apply_direction,
    check_momentum,
    compute_system,
    gram_gauss_newton_direction,
    prefers_parameter_space,
    restore_parameters,
    scale_step,
    step_scale,
)


def check_per_sample_independence(model: nn.Module) -> None:
    """Raise if ``model`` couples the samples of a batch (BatchNorm in training mode).

    GGN needs ``f(w, x_i)`` to depend on ``x_i`` alone: BatchNorm in training mode normalises
    with batch statistics, so each output depends on the whole batch.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: a BatchNorm in training mode, named.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"check_per_sample_independence needs an nn.Module, got {type(model).__name__}")
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

    with :math:`J_B` and :math:`f` evaluated at the weights *before* the decay. With
    ``momentum`` :math:`\mu > 0` (SPRING, Goldshlager, Abrahamsen & Lin 2024) the step taken,
    :math:`w \leftarrow (1 - \mathrm{wd})\, w - \phi_t`, is

    .. math::
        \phi_t = \mu \phi_{t-1} + J_B^\top (\lambda G_B + \alpha I)^{-1} (r_B - \lambda \mu J_B \phi_{t-1}),

    the minimiser of :math:`\lambda \|J_B \phi - r_B / \lambda\|^2 + \alpha \|\phi - \mu \phi_{t-1}\|^2`
    (:math:`r_B = f(w, x_B) - y_B`; :math:`\mu = 0` is Eq. 11 exactly). :math:`J_B \phi_{t-1}` comes
    from the engine's per-sample pieces, without another pass; :math:`\phi` is kept in the state
    (``momentum_buffer``, one per parameter). With ``bias_correction`` or ``max_step_norm`` the
    step taken is :math:`s_t \phi_t` (:func:`~gramnewton.update.step_scale`), the recursion
    keeps the unscaled :math:`\phi_t` (as SPRING's learning rate and norm constraint do). ``lr``
    multiplies the step taken and the decay, :math:`w \leftarrow (1 - \mathrm{lr}\,\mathrm{wd})\, w
    - \mathrm{lr}\, s_t \phi_t`, for ``torch.optim.lr_scheduler`` (``lr = 1``, the default: the
    formulas above exactly).

    Symbols of Eq. 11 and their arguments:
        - :math:`w`: ``params_or_model`` (the parameters to train).
        - :math:`f(w, x_B) - y_B`: what ``closure()`` returns, per sample, unreduced,
          shape ``(b,)`` or ``(b, k)`` (or ``(b, ...)``, e.g. a field per sample: flattened to
          ``(b, k)``); or the pair ``(f(w, x_B), y_B)``, whose shapes must
          match (no broadcasting; the targets are cast to the outputs' dtype). A damping rule
          with a ``subset`` (:class:`~gramnewton.damping.GainRatioDamping`) re-evaluates
          only the batch's first rows, by calling ``closure(rows)`` with ``rows`` a ``slice``:
          the closure must then take it, e.g. ``lambda rows=slice(None): model(x[rows]) - y[rows]``.
          A closure may draw random numbers (dropout, sampled points): every re-evaluation in a
          step (the gain ratio, geodesic acceleration) replays the draws of its first run.
        - :math:`J_B`: per-sample Jacobian ``(b*k, m)`` of those residuals, rows sample-major
          (row ``i*k + c`` is sample ``i``, output ``c``); never formed by the fast engine in
          sample space.
        - :math:`\lambda`: ``lam > 0``. :math:`\alpha`: ``alpha >= 0`` (acts as an inverse learning
          rate; the paper uses ``lam=1`` and ``alpha`` in 0.075-0.3). ``alpha=0`` with ``lam=1``
          is Eq. 10; with the whole data set in the closure it is the full-batch Eq. 9.
        - :math:`\mu`: ``momentum``, in ``[0, 1)``.
        - ``weight_decay`` (wd): decoupled, ``w <- (1 - wd) w`` in the same step.
        - ``lr``: a multiplier of the step taken (and of the decay), ``1`` by default.

    Args:
        params_or_model: an ``nn.Module`` (the fast engine then hooks it; BatchNorm in training
            mode is refused) or an iterable of parameters or parameter groups (torch.optim's
            ``model.parameters()``: with ``engine="auto"`` the first step runs the closure once
            more, without gradients, to find the modules that own them, and the fast engine
            hooks those).
        lam: scale of the Gram matrix.
        alpha: Tikhonov damping added to ``lam * G``.
        weight_decay: decoupled weight decay per step, in ``[0, 1)``. A damping rule's gain
            ratio judges the step without it (the decay is applied once the step is accepted).
        lr: the fraction of the step taken, ``>= 0`` (with ``lr * weight_decay < 1``): the
            handle of ``torch.optim.lr_scheduler``'s schedulers, which read and write
            ``param_groups[i]["lr"]``. Without momentum the step (not the decay) is the one of
            ``lam / lr`` and ``alpha / lr``; with it, the recursion keeps the unscaled
            :math:`\phi_t`. The gain ratio judges the step taken; at ``lr = 0`` (a warm-up's
            first step, a schedule's end) the step is zero and the damping rule is not consulted.
        engine: ``"auto"`` (fastest supported), ``"hooks"`` (per-layer factors, needs a model),
            ``"reference"`` (dense Jacobian, any model), ``"functional"`` (``torch.func``, fast
            and exact for a :class:`~gramnewton.engines.FunctionalResidual` closure, e.g. a
            physics-informed residual), or an engine instance.
        solve_dtype: dtype of the small solve, ``torch.float32`` or ``torch.float64`` (``None``:
            the parameters' own, float32 for bfloat16 and float16 ones).
        adaptive_damping: ``"auto"`` (default: ``GainRatioDamping(check_every=4)``, which
            re-evaluates only one step in four once ``alpha`` sits at its floor with gain ratios
            near one; a fixed ``alpha`` with ``distributed="local"``), ``True`` or ``"gain_ratio"`` (a
            :class:`~gramnewton.damping.GainRatioDamping`: Levenberg-Marquardt's gain ratio, one
            extra forward pass without gradients per step), ``"cross_validated"`` (a
            :class:`~gramnewton.damping.CrossValidatedDamping`), a mapping ``{"name": ...,
            **arguments}`` naming one of those two with its arguments (e.g. from a JSON
            grid, or a lab config's ``[optimizer.adaptive_damping]`` table), any
            :class:`~gramnewton.damping.DampingRule`, or ``False`` (fixed ``alpha``). A step the
            rule rejects is undone: parameters and momentum as before, not counted. A rule may
            also set each step's ``alpha`` from the batch's Gram system before the solve, and may
            skip the extra forward pass (:mod:`gramnewton.damping`), or solve a rejected step
            again from the same batch's system (``GainRatioDamping(retries=n)``). ``alpha`` in
            ``param_groups`` then holds the current value.
        momentum: :math:`\mu` of the sample-space momentum above; ``0`` is Eq. 11. With a
            damping rule, a step that follows two rejected steps in a row restarts from
            :math:`\phi_{t-1} = 0` (``alpha`` cannot shrink :math:`\mu \phi_{t-1}`).
        bias_correction: take ``phi_t / sqrt(1 - mu^(2t))``, ``t`` the momentum steps since
            :math:`\phi` last started from zero (off by default).
        max_step_norm: bound ``C`` on the Euclidean norm of the step taken over all parameters:
            ``phi_t`` is scaled down to norm ``C`` when longer (``None``, the default: no bound).
        solve_space: ``"sample"`` solves the ``(b*k, b*k)`` system above; ``"parameter"`` the
            ``(m, m)`` system ``(lam J^T J + alpha I) phi_t = J^T r + alpha mu phi_{t-1}``, equal by
            the push-through identity (Levenberg-Marquardt; needs the dense ``J``, so only for
            small ``m``); ``"auto"`` (default) the parameter space when ``b*k > m`` if that
            system is solved by the float64 normal equations, ``b*k > 2 m`` if by QR (see
            :func:`~gramnewton.update.prefers_parameter_space`).
        loss: ``"mse"`` (Eq. 11; the closure returns residuals ``f - y``), ``"cross_entropy"``,
            ``"binary_cross_entropy"`` or a :class:`~gramnewton.losses.Loss` instance. For a loss
            other than ``"mse"`` the closure returns ``(outputs, targets)`` (for cross-entropy
            ``(logits (b, k), labels (b,))`` int64, or probabilities ``(b, k)``) and the step is the
            damped generalized Gauss-Newton step of the summed loss ``sum_i l_i``,
            ``w <- (1 - wd) w - (lam J^T H J + alpha I)^{-1} J^T g``, solved in sample space
            (:mod:`gramnewton.generalized`); the gain ratio of adaptive damping then compares
            loss decreases. Momentum and ``solve_space`` apply to it unchanged, with ``r`` and
            ``J`` those of the pseudo-residuals (``u`` and ``B^T J``).
        curvature: output-Hessian estimate for a loss other than ``"mse"``: ``"exact"`` (``k``
            backward passes, a ``(b*k, b*k)`` Gram), ``"top_c"`` (``top_c + 1`` passes) or
            ``"gradient"`` (one pass, ``(b, b)``); ``"auto"`` (default) is ``"gradient"``, chosen
            by measurement (docs/classification.md), and ``"exact"`` for ``"mse"``; see
            :mod:`gramnewton.generalized`.
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
        metric: the metric of the step (:mod:`gramnewton.metric`): ``None`` or ``"euclidean"``
            the Euclidean one above; ``"second_moment"`` (a :class:`~gramnewton.metric.SecondMomentMetric`:
            the square root of Adam's, from the second moment of the batch gradients), a mapping
            ``{"name": "second_moment", **arguments}`` or a metric instance; ``"auto"`` (default)
            one weight per tensor with ``power=1`` (``{"name": "second_moment", "per_tensor":
            True, "power": 1}``, chosen by measurement: docs/convergence.md, fortieth session) for
            the square loss with a damping rule, on every step solved in sample space (a step the
            ``"auto"`` solve space puts in parameter space, with more residuals than parameters,
            is then Levenberg-Marquardt's Euclidean one), and ``None`` otherwise (another loss:
            on the cross-entropy the metric trained slower, docs/classification.md; a
            fixed ``alpha`` (``adaptive_damping=False``: the formula above exactly),
            ``distributed="local"``, ``solve_space="parameter"``, an engine that can weight
            neither its Gram nor its columns). With a diagonal
            metric ``D`` the step is :math:`\phi_t = \mu \phi_{t-1} + D J_B^\top (\lambda J_B D
            J_B^\top + \alpha I)^{-1} (r_B - \lambda \mu J_B \phi_{t-1})`, solved in sample space
            from the engine's dense per-sample rows (``{"name": "second_moment", "per_tensor":
            True}``: one weight per parameter tensor, from the engine's per-parameter Gram
            blocks at the Euclidean Gram's cost); the second moment is kept in the state as its
            root ``sqrt(v)`` (``metric_root_moment``, one per parameter, in its dtype: float32 keeps
            ``g``'s range, where ``v = g^2`` would underflow or overflow; a ``state_dict`` of an
            older version, with ``metric_moment = v``, is loaded as its root) and ``metric_count``,
            and advances only on an accepted step. With ``distributed="exact"`` one weight per
            tensor only (each rank holds a slice of ``J``'s columns); not with
            ``distributed="local"``.
        geodesic_acceleration: ``True`` (a :class:`~gramnewton.update.GeodesicAcceleration`
            with its defaults) or an instance: Levenberg-Marquardt's geodesic acceleration, the
            step ``v`` replaced by ``v + a/2`` with ``a = -J^T (lam G + alpha I)^{-1} lam r_vv``
            and ``r_vv`` the residuals' second derivative along ``v`` (one forward pass without
            gradients and one more solve, with the step's factorisation, a step; used when
            ``2 ||a|| / ||v|| <= max_ratio``).
            Square loss only, not distributed; ``False`` (default): off.

    The defaults (``lam=16, alpha=0.3, momentum=0.9``, gain-ratio damping and with it one metric
    weight per tensor) come from the races of ``docs/convergence.md``: on mini-batches a short step
    (each batch's outputs moved 1/16 of the way to its targets) averages the batch noise that a
    long step fits, the momentum carries the part of the step that batches agree on, and the
    metric (Adam's, one weight per tensor) lowers the test loss reached at a given training loss. ``lam=1, alpha=0, momentum=0,
    adaptive_damping=False`` is the paper's Eq. 10 (Eq. 9 with the whole data set).

    ``lam``, ``alpha``, ``momentum`` and ``lr`` live in ``param_groups`` and must agree across groups
    (one system is solved for all parameters); ``weight_decay`` may differ per group. After every step
    ``last_diagnostics`` (:class:`~gramnewton.diagnostics.StepDiagnostics`) holds the losses,
    predicted decrease, gain ratio, damping, solve and step norm.

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
        lam: float = 16.0,
        alpha: float = 0.3,
        weight_decay: float = 0.0,
        lr: float = 1.0,
        engine: str | GramEngine = "auto",
        solve_dtype: torch.dtype | None = None,
        adaptive_damping: bool | str | Mapping[str, Any] | DampingRule = "auto",
        momentum: float = 0.9,
        bias_correction: bool = False,
        max_step_norm: float | None = None,
        solve_space: str = "auto",
        loss: str | Loss = "mse",
        curvature: str = "auto",
        top_c: int = 1,
        distributed: str | None = "auto",
        process_group: dist.ProcessGroup | None = None,
        geodesic_acceleration: bool | GeodesicAcceleration = False,
        metric: str | Mapping[str, Any] | SecondMomentMetric | None = "auto",
    ):
        _check_hyper(lam, alpha, weight_decay, momentum, lr)
        check_solve_dtype(solve_dtype)
        if solve_space not in SOLVE_SPACES:
            raise ValueError(f"Invalid solve_space: {solve_space!r}; expected one of {SOLVE_SPACES}")
        if not isinstance(bias_correction, bool):
            raise ValueError(f"Invalid bias_correction: {bias_correction!r} (must be True or False)")
        if max_step_norm is not None and (not is_number(max_step_norm) or not 0 < max_step_norm < math.inf):
            raise ValueError(f"Invalid max_step_norm value: {max_step_norm!r} (must be a finite number > 0, or None)")
        self.bias_correction, self.max_step_norm = bias_correction, max_step_norm
        self.distributed = resolve_mode(distributed, process_group)
        self.loss = get_loss(loss)
        check_curvature(curvature, top_c)
        self.curvature, self.top_c = resolve_curvature(curvature, self.loss), top_c
        self.acceleration = _acceleration(geodesic_acceleration, self.loss, self.distributed)
        self.model = params_or_model if isinstance(params_or_model, nn.Module) else None
        params = self.model.parameters() if self.model is not None else params_or_model
        super().__init__(params, dict(lam=lam, alpha=alpha, weight_decay=weight_decay, momentum=momentum, lr=lr))
        trainable = self._trainable()
        if not trainable:
            raise ValueError("GramGaussNewton got no parameter that requires grad")
        self._module = self.model.module if isinstance(self.model, DistributedDataParallel) else self.model
        self._engine_choice = engine
        # given parameters only, the first step finds the modules owning them (_use_called_modules):
        # for "auto" to choose the hooks engine, and for every engine to refuse a batch-coupling one
        self._find_model = self._module is None
        self._called_modules: nn.Module | None = None  # found so, for a named engine: checked only
        self.solve_dtype = solve_dtype
        self.solve_space = solve_space
        if adaptive_damping == "auto":  # local steps have no common gain ratio: fixed alpha there
            adaptive_damping = self.distributed != "local" and GainRatioDamping(check_every=4)
        self.damping: DampingRule | None = damping_rule(adaptive_damping)
        # "auto": one metric weight per tensor where it was measured and can run (the square loss,
        # steps solved in sample space, a damping rule; not local steps); the Euclidean step
        # elsewhere, so that a fixed alpha (adaptive_damping=False) gives the design's formula exactly
        self._metric_auto = metric == "auto"
        if self._metric_auto:
            usable = (
                isinstance(self.loss, SquaredError)
                and self.distributed != "local"
                and solve_space != "parameter"
                and self.damping is not None
            )
            metric = SecondMomentMetric(per_tensor=True, power=1.0) if usable else None
        self.metric = metric_from(metric)
        if self.metric is not None and self.distributed == "local":
            raise ValueError("a metric is not supported with distributed='local' (metric=None there)")
        if self.metric is not None and self.distributed == "exact" and not self.metric.per_tensor:
            raise ValueError(
                "distributed='exact' supports a metric with one weight per tensor only "
                '({"name": "second_moment", "per_tensor": True}); each rank holds a slice of J\'s columns'
            )
        if self.metric is not None and solve_space == "parameter":
            raise ValueError("a metric's step is solved in sample space: use solve_space='auto' or 'sample'")
        check_subset(self._subset())
        if self._subset() is not None and self.distributed is not None:
            raise ValueError("a damping rule's subset re-evaluation is not supported with distributed training")
        self.communicator: Communicator | None = None
        if self.distributed is not None:
            if self.distributed == "local" and self.damping is not None:
                raise ValueError("adaptive_damping needs distributed='exact' (local steps have no common gain ratio)")
            self.communicator = Communicator(process_group, trainable[0].device)
            # as DDP does: every rank starts from rank 0's parameters, frozen ones too (each rank's
            # forward pass must be the one model's), and buffers (e.g. fixed random layers)
            every = list({id(p): p for group in self.param_groups for p in group["params"]}.values())
            self.communicator.broadcast_(every + (list(self.model.buffers()) if self.model is not None else []))
        self.engine = self._build_engine(trainable)
        self.last_step: GramGaussNewtonStep | None = None
        # after two rejected steps in a row the next one starts its momentum afresh (phi_{t-1} = 0):
        # raising alpha shrinks only the new part of a momentum step, never mu * phi_{t-1}, so a
        # momentum step that keeps failing would otherwise be retried and rejected forever
        self.rejections_in_a_row = 0
        self.last_gain_ratio: float | None = None
        self.last_diagnostics: StepDiagnostics | None = None
        if self.communicator is not None:  # compared between the ranks by every status exchange
            self.communicator.settings = self._rank_settings

    def _rank_settings(self) -> dict[str, Any]:
        """What every rank must hold alike for its step to be a part of one step: the groups'
        hyper-parameters, the momentum's and the damping rule's state (one rank that loaded a
        checkpoint the others did not, or changed ``lr`` alone, would otherwise take another step
        than the others, or wait forever at a collective the others do not reach)."""
        settings: dict[str, Any] = {}
        for i, group in enumerate(self.param_groups):
            for key, value in group.items():
                if key != "params":
                    settings[key if i == 0 else f"{key} (param group {i})"] = value
        rule = getattr(self.damping, "state_dict", None)
        settings.update(
            loss=type(self.loss).__name__,
            curvature=self.curvature,
            top_c=self.top_c,
            solve_space=self.solve_space,
            solve_dtype=self.solve_dtype,
            bias_correction=self.bias_correction,
            max_step_norm=self.max_step_norm,
            metric=None if self.metric is None else type(self.metric).__name__,
            damping_rule=type(self.damping).__name__,
            damping=rule() if rule else None,
            rejections_in_a_row=self.rejections_in_a_row,
            momentum_buffer=self._momentum_buffers() is not None,
            momentum_count=self._momentum_count(),
            metric_count=max((int(s.get("metric_count", 0)) for s in self.state.values()), default=0),
        )
        return settings

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's ``add_param_group``, checked before it changes anything; a group that does not
        set ``alpha`` gets the one the steps use now (the damping rule adapts it, and one system
        is solved for all groups: they share it), the other hyper-parameters the constructor's."""
        if "alpha" not in param_group and self.param_groups:
            param_group = {**param_group, "alpha": self._shared("alpha")}
        params = param_group["params"]
        if not isinstance(params, set):  # torch's own error for a set
            params = [params] if isinstance(params, Tensor) else list(params)  # a generator is read once
            param_group = {**param_group, "params": params}
            _check_group_params(params)
        group = {**self.defaults, **param_group}
        _check_hyper(group["lam"], group["alpha"], group["weight_decay"], group["momentum"], group["lr"])
        super().add_param_group(param_group)

    def state_dict(self) -> dict[str, Any]:
        """torch's optimizer state (``"state"``: step counts, momentum ``phi``; ``"param_groups"``:
        ``lam``, ``alpha``, ...) and, under ``"gramnewton"``, what else decides the next steps:
        the rejections in a row (the momentum restart) and the damping rule's own state (e.g.
        :class:`~gramnewton.damping.GainRatioDamping`'s trust), so that a run resumed from it
        takes the steps an uninterrupted one would. Plain numbers: ``weights_only`` loads it."""
        with _hooks_held(self, "_optimizer_state_dict_post_hooks") as post_hooks:
            state = super().state_dict()
        rule = getattr(self.damping, "state_dict", None)
        state["gramnewton"] = {"rejections_in_a_row": self.rejections_in_a_row, "damping": rule() if rule else {}}
        for hook in post_hooks:  # as torch runs them, on the whole state_dict ("gramnewton" too)
            result = hook(self, state)
            state = state if result is None else result
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load :meth:`state_dict`'s output (one without ``"gramnewton"``, from an older version,
        leaves the rejection count and the damping rule's state as they are; one without ``lr``
        gets ``lr = 1``)."""
        state_dict = dict(state_dict)
        for hook in self._optimizer_load_state_dict_pre_hooks.values():  # as torch: on the whole of it
            result = hook(self, state_dict)
            state_dict = state_dict if result is None else dict(result)
        extra = state_dict.pop("gramnewton", None)
        _check_saved_groups(state_dict)
        _check_state_shapes(state_dict, self.param_groups)
        rule = extra["damping"] if extra is not None and self.damping is not None else None
        if rule:  # refused (e.g. another rule's state) before anything is loaded
            copy.deepcopy(self.damping).load_state_dict(rule)
        with (
            _hooks_held(self, "_optimizer_load_state_dict_pre_hooks"),
            _hooks_held(self, "_optimizer_load_state_dict_post_hooks") as post_hooks,
        ):
            super().load_state_dict(state_dict)
        for group in self.param_groups:
            group.setdefault("lr", 1.0)  # a state_dict saved before lr existed
        if extra is not None:
            self.rejections_in_a_row = int(extra["rejections_in_a_row"])
            if rule:
                self.damping.load_state_dict(rule)
        for hook in post_hooks:  # once everything is loaded
            hook(self)

    def __getstate__(self) -> dict[str, Any]:
        """What ``copy.deepcopy`` and ``pickle`` keep: torch's (defaults, ``state``,
        ``param_groups``; no hooks, as torch) and the optimizer's settings and damping state,
        without the engine, which :meth:`__setstate__` builds again for the copied parameters
        (torch kept the first three only: a copy's step raised ``AttributeError``)."""
        return {k: v for k, v in self.__dict__.items() if k != "engine" and not k.startswith("_optimizer_")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        """A copy's state (:meth:`__getstate__`), or torch's ``load_state_dict``'s (``state`` and
        ``param_groups`` only: the engine stays). A metric's second moment ``metric_moment = v`` of
        an older version becomes the root ``metric_root_moment = sqrt(v)`` kept now."""
        differentiable = "differentiable" in (state["defaults"] if "defaults" in state else self.defaults)
        super().__setstate__(state)
        for saved in self.state.values():  # torch's copies (load_state_dict's, a copy's): not the caller's dicts
            if "metric_moment" in saved:
                moment = saved.pop("metric_moment")  # a NaN or negative entry: a NaN root, refused at the next step
                saved.setdefault("metric_root_moment", moment.sqrt())
        if not differentiable:  # torch adds it to the defaults, and add_param_group would to the groups
            del self.defaults["differentiable"]
        if "defaults" in state:  # a copy: an engine for its parameters
            self.engine = self._build_engine(self._trainable())

    def _check_start(self, closure: Closure | None) -> None:
        """What :meth:`step` refuses before it evaluates anything: no closure, inference mode, bad
        hyper-parameters, a closure that cannot take the damping rule's rows, a module coupling
        the samples (BatchNorm in training mode); also follows the parameters that require grad."""
        if closure is None:  # torch.optim's opt.step() after loss.backward()
            raise ValueError(
                "GramGaussNewton.step needs a closure that returns per-sample residuals, e.g. "
                "opt.step(lambda: model(x) - y); it forms its own Jacobian (no loss.backward() needed); "
                "no parameter was changed"
            )
        if torch.is_inference_mode_enabled():  # enable_grad cannot leave it: the closure would build no graph
            raise ValueError(
                "GramGaussNewton.step needs autograd (the Jacobian comes from the closure's graph) but was "
                "called inside torch.inference_mode(); no parameter was changed"
            )
        devices = {p.device.type for group in self.param_groups for p in group["params"]}
        autocast = sorted(d for d in devices if torch.amp.is_autocast_available(d) and torch.is_autocast_enabled(d))
        if autocast:  # the solve, the direction and the update would run in its lower precision too
            raise ValueError(
                f"GramGaussNewton.step was called inside torch.autocast ({autocast[0]}): its Gram solve and "
                "update would run in the autocast dtype; run only the model under autocast, inside the closure "
                "(def closure(): with torch.autocast(...): return model(x) - y); no parameter was changed"
            )
        for group in self.param_groups:
            _check_hyper(group["lam"], group["alpha"], group["weight_decay"], group["momentum"], group["lr"])
        self._follow_trainable()
        if self._subset() is not None and not _takes_rows(closure):
            raise ValueError(
                f"the damping rule re-evaluates a subset of {self._subset()} samples, so the closure must "
                "take the rows to evaluate: closure(rows), rows a slice of the batch (e.g. "
                "`lambda rows=slice(None): model(x[rows]) - y[rows]`); no parameter was changed"
            )
        if self._find_model:
            self._use_called_modules(closure)
        module = self._called_modules if self._module is None else self._module
        if module is not None:
            check_per_sample_independence(module)

    def _trainable(self) -> list[Tensor]:
        """The parameters of ``param_groups`` that require grad, in order: the ones a step trains."""
        return [p for group in self.param_groups for p in group["params"] if p.requires_grad]

    def _build_engine(self, trainable: list[Tensor]) -> GramEngine:
        engine = select_engine(trainable, self._module, self._engine_choice)
        return ExactGramEngine(engine, self.communicator) if self.distributed == "exact" else engine

    def _follow_trainable(self) -> None:
        """Rebuild the engine when the parameters to train changed since it was built: a group
        added by ``add_param_group``, a parameter frozen or unfrozen through ``requires_grad``.
        As with torch.optim, a step trains every parameter of ``param_groups`` that requires grad,
        and only those (a parameter new to the steps starts from ``phi = 0``, the others keep their
        momentum; under ``torch.distributed`` every rank must change alike, and rank 0's values of
        the new ones are broadcast as at construction)."""
        trainable = self._trainable()
        if [id(p) for p in trainable] == [id(p) for p in self.engine.params]:
            return
        if not trainable:
            raise ValueError("GramGaussNewton got no parameter that requires grad; no parameter was changed")
        if not isinstance(self._engine_choice, str):
            raise ValueError(
                "the parameters that require grad are no longer those of the engine instance passed as "
                "`engine`; pass the engine by name (e.g. engine='auto') or build a new optimizer; "
                "no parameter was changed"
            )
        known = {id(p) for p in self.engine.params}
        new = [p for p in trainable if id(p) not in known]
        for p in new:  # a phi (and a metric's moment) kept from before it was frozen is stale
            self.state[p].pop("momentum_buffer", None)
            self.state[p].pop("metric_root_moment", None)
        if self.communicator is not None:
            self.communicator.broadcast_(new)
        self.engine = self._build_engine(trainable)

    def _shared(self, key: str) -> float:
        values = {group[key] for group in self.param_groups}
        if len(values) != 1:
            raise ValueError(f"{key} must be the same in every param group (one system is solved), got {values}")
        return values.pop()

    @torch.enable_grad()  # the closure's graph is the Jacobian's source, also when called under no_grad
    def step(self, closure: Closure | None = None) -> Tensor:  # type: ignore[override]
        """Take one step on the mini-batch whose residuals ``closure()`` returns.

        With ``loss="mse"`` ``closure()`` returns the residuals ``(b,)``, ``(b, k)`` or ``(b, ...)``; with
        another loss it returns ``(outputs, targets)``.

        Returns:
            The batch's mean loss before the update (detached scalar): for ``"mse"`` the mean of
            the squared residuals, else the mean of ``l_i``.

        Raises:
            ValueError: bad hyper-parameters, bad residuals (shape, broadcast, dtype, NaN/Inf, no
                dependence on the parameters) or a batch-coupling module; nothing is changed.
            SingularGramError: no finite step (the loss, Gram matrix, coefficients or direction
                overflows); nothing is changed.
            Any error of the closure's re-evaluation or of the damping rule restores the
            parameters and the state before it propagates.
        """
        # re-evaluations draw the first run's numbers (the groups' parameters: the engine may change
        # in _check_start, when the parameters that require grad do)
        with replayable_randomness(p for group in self.param_groups for p in group["params"]):
            try:
                self._check_start(closure)
            except Exception as error:
                if self.communicator is not None:  # the other ranks wait at the step's status exchange: all raise
                    self.communicator.fail_everywhere(error)
                raise
            before = self._damping_state()
            try:
                return self._step(self._without_ddp_sync(closure))
            except BaseException:  # the parameters are restored where they changed (_adapt_damping)
                self._restore_damping_state(before)
                raise

    def _damping_state(self) -> tuple[list[float], int, float | None, Any] | None:
        """What a step changes besides the parameters and ``self.state`` (``None`` without a
        damping rule, which changes none of it): each group's ``alpha``, the rejections in a
        row, the last gain ratio and the rule's own state (a rejected step, a retry's or
        :class:`~gramnewton.damping.CrossValidatedDamping`'s ``choose_alpha`` change it before
        a later call of the closure may raise)."""
        if self.damping is None:
            return None
        rule = getattr(self.damping, "state_dict", None)
        alphas = [group["alpha"] for group in self.param_groups]
        return alphas, self.rejections_in_a_row, self.last_gain_ratio, rule() if rule else None

    def _restore_damping_state(self, state: tuple[list[float], int, float | None, Any] | None) -> None:
        """Put back :meth:`_damping_state`'s ``state``."""
        if state is None:
            return
        alphas, self.rejections_in_a_row, self.last_gain_ratio, rule = state
        for group, alpha in zip(self.param_groups, alphas):
            group["alpha"] = alpha
        if rule is not None:
            self.damping.load_state_dict(rule)

    def _use_called_modules(self, closure: Closure) -> None:
        """Given parameters only (torch.optim's idiom): the modules the first step's closure calls
        that own them (:func:`~gramnewton.engines.select.called_modules`: one run without
        gradients, with the step's random draws). With ``engine="auto"`` they become the model, so
        that the hooks engine computes their rows instead of the reference engine's backward pass
        per row; with a named engine or an instance the engine stays, and every step checks them
        as it checks a model (a BatchNorm in training mode is refused whatever the engine)."""
        # a BatchNorm in training mode is refused before its forward pass changes its statistics
        module = called_modules(closure, self.engine.params, before_call=check_per_sample_independence)
        self._find_model = False
        if module is not None and self._engine_choice != "auto":
            self._called_modules = module
        elif module is not None:
            # a DistributedDataParallel wrapper, as if it had been given: its forward passes run
            # under no_sync() (DDP would wait for a gradient reduction GGN never starts)
            self.model = module
            self._module = module.module if isinstance(module, DistributedDataParallel) else module
            self.engine = self._build_engine(self._trainable())

    def _step(self, closure: Closure) -> Tensor:
        """:meth:`step` once its arguments are checked."""
        general = (
            None
            if isinstance(self.loss, SquaredError)
            else LossClosure(self.loss, closure, self.curvature, self.top_c, params_dtype(self.engine.params))
        )
        lam, alpha, momentum, lr = (self._shared(key) for key in ("lam", "alpha", "momentum", "lr"))
        choose = getattr(self.damping, "choose_alpha", None)
        previous = self._momentum_buffers() if momentum and self.rejections_in_a_row < 2 else None
        hyper = dict(lam=lam, solve_dtype=self.solve_dtype, momentum=momentum, solve_space=self.solve_space)
        system = None  # the batch's system, kept for a rejected step's retries (not in local mode)
        metric_root = None  # the metric's root second moment after this batch, kept if the step is accepted
        if self.distributed == "local":
            losses = (lambda s: s.residuals.pow(2)) if general is None else (lambda s: general.per_sample)
            result, loss = local_direction(
                self.engine,
                general or closure,
                self.communicator,
                losses=losses,
                alpha=alpha,
                previous=previous,
                **hyper,
            )
            if general is not None:  # this rank's own batch, as the single-process step records it
                result = replace(result, mean_loss=general.per_sample.mean())
        else:
            if self.metric is not None:
                system, metric_root = self._metric_system(general or closure, need_gram=choose is not None)
            else:
                system = compute_system(
                    self.engine,
                    general or closure,
                    self.solve_space,
                    skip_gram=choose is None,
                    solve_dtype=self.solve_dtype,
                )
            mean_loss = None
            if general is not None:
                total = self._total(lambda: (general.per_sample.double().sum(), general.per_sample.numel()), 2)
                mean_loss = (total[0] / total[1]).to(general.per_sample)

            def solve(
                alpha: float, previous: list[Tensor] | None, choose_alpha: Callable | None
            ) -> GramGaussNewtonStep:
                result = gram_gauss_newton_direction(
                    self.engine,
                    general or closure,
                    alpha=alpha,
                    previous=previous,
                    choose_alpha=choose_alpha,
                    acceleration=self.acceleration,
                    system=system,
                    **hyper,
                )
                return result if mean_loss is None else replace(result, mean_loss=mean_loss)

            result = solve(alpha, previous, None if choose is None else lambda batch: choose(alpha, batch, lam))
            loss = result.loss
        backup = [p.detach().clone() for p in self.engine.params] if self.damping else None
        retries = getattr(self.damping, "retries", 0) if system is not None else 0
        if not retries:  # nothing to solve again: the system (a dense J, for some engines) may go now
            system = None
        for retry in range(retries + 1):
            if retry:  # the rejected step's batch, solved again with the rule's new alpha
                if self.rejections_in_a_row >= 2:
                    previous = None
                result = solve(self._shared("alpha"), previous, None)
            count = self._momentum_count() + 1 if previous is not None else 1  # t in phi's recursion
            phi, taken = self._apply(result, momentum, count, lr)
            diagnostics = _diagnostics(taken, lam, momentum)
            if self.damping is not None and lr:  # a step of length zero (lr = 0) has no gain ratio to judge
                diagnostics = self._adapt_damping(closure, taken, backup, diagnostics, general)
            if not diagnostics.rejected:
                break
        diagnostics = replace(diagnostics, retries=retry)
        if self.damping is not None and not diagnostics.rejected:
            self._decay(backup, lr)
        if not diagnostics.rejected:
            self._count_step(phi, count, metric_root)
        self.last_step = taken
        self.last_diagnostics = diagnostics
        return loss

    def _apply(
        self, result: GramGaussNewtonStep, momentum: float, count: int, lr: float
    ) -> tuple[list[Tensor] | None, GramGaussNewtonStep]:
        """Apply ``result``'s step, scaled by ``lr`` and ``bias_correction``/``max_step_norm`` (``count``:
        the momentum steps since ``phi`` started from zero, this one included);
        returns ``phi_t`` (the momentum state to keep, before any scaling; ``None`` without
        momentum) and the step taken. Without a damping rule the decay is applied with it."""
        # the recursion's phi_t, before any scaling (the momentum state to keep)
        phi = torch._foreach_neg([d.detach() for d in result.direction]) if momentum else None
        scale = lr
        if self.bias_correction or self.max_step_norm is not None:
            scale *= step_scale(
                result.direction_norm,
                momentum,
                count,
                bias_correction=self.bias_correction,
                max_step_norm=self.max_step_norm,
            )
        if scale != 1.0:
            result = scale_step(result, scale)
        updates = {id(p): d for p, d in zip(self.engine.params, result.direction)}
        for group in self.param_groups:
            params = [p for p in group["params"] if id(p) in updates]
            # with a damping rule the decay waits for the verdict: the gain ratio judges the
            # Gauss-Newton step alone (the decay is not part of the loss model it tests)
            decay = 0.0 if self.damping is not None else lr * group["weight_decay"]
            apply_direction(params, [updates[id(p)] for p in params], decay)
        return phi, result

    def _count_step(self, phi: list[Tensor] | None, count: int, metric_root: tuple[Tensor, int] | None) -> None:
        """Record an accepted step: each parameter's step count and, with momentum, ``phi_t`` (and
        its ``count`` under ``bias_correction``); with a metric its root second moment and count."""
        states = [self.state[p] for p in self.engine.params]
        # One new count tensor per distinct old one (usually one for all parameters, which then
        # share it) instead of one per parameter (~3 us each). Never updated in place, so the
        # sharing cannot leak (an optimizer that loaded this one's state_dict holds the same
        # tensor objects: torch does not copy "step"). The old ones stay referenced in `counts`,
        # so no id is reused within the loop.
        counts: dict[int, tuple[Tensor | None, Tensor]] = {}
        for state in states:
            old = state.get("step")
            if id(old) not in counts:
                counts[id(old)] = (old, torch.tensor(1.0, device="cpu") if old is None else old + 1)
            state["step"] = counts[id(old)][1]
        # phi and the moment in each parameter's dtype, the counts as Python ints: torch's
        # load_state_dict casts every tensor but "step" to its parameter's dtype (a float64 phi of
        # a float32 parameter, a count of 257 in bfloat16: 256), and a resumed run must take the
        # steps an uninterrupted one takes
        params = self.engine.params
        if phi is not None:  # phi_t: the step taken without the decay (and without s_t)
            for p, state, buffer in zip(params, states, phi):
                state["momentum_buffer"] = buffer.to(p.dtype)
                if self.bias_correction:
                    state["momentum_count"] = count
        if metric_root is not None:
            root, metric_count = metric_root
            for p, state, part in zip(params, states, split_like(root, params)):
                state["metric_root_moment"], state["metric_count"] = part.to(p.dtype), metric_count

    def _metric_system(self, closure: Closure, need_gram: bool) -> tuple[GramSystem, tuple[Tensor, int] | None]:
        """The batch's system in the metric (:func:`~gramnewton.metric.metric_system`; the engine
        skips the plain Gram), and the metric's root second moment ``(m,)`` with its count after
        this batch: the state :meth:`_count_step` keeps once the step is accepted.

        Under ``metric="auto"`` a batch whose step the ``"auto"`` solve space puts in parameter
        space (more residuals than parameters: Levenberg-Marquardt's regime) gets the Euclidean
        system instead (its plain Gram only if ``need_gram``: a damping rule that reads it; in
        ``distributed="exact"`` always, since that step is solved in sample space), and ``None`` for
        the moment, which stays as it was; so does a batch whose engine can weight neither its Gram
        nor its columns."""
        engine = self.engine
        exact = isinstance(engine, ExactGramEngine)

        def euclidean(rows: int) -> bool:
            return (
                self._metric_auto
                and self.solve_space == "auto"
                and prefers_parameter_space(rows, engine.params, self.solve_dtype)
            )

        if exact:  # its steps are solved in sample space: a Euclidean one needs the plain Gram
            system = engine.compute(closure, form_gram=euclidean)
        elif getattr(engine, "can_skip_gram", False):
            system = engine.compute(closure, form_gram=lambda rows: need_gram and euclidean(rows))
        else:
            system = engine.compute(closure)
        if euclidean(system.residuals.numel()):
            return system, None
        if self._metric_auto and system.weighted_gram is None and system.jacobian_columns is None:
            return system, None  # an engine of your own that can form neither J D J^T nor J (its Gram is formed)
        gradient = batch_gradient(system)
        states = [self.state.get(p, {}) for p in engine.params]
        # a parameter new to the steps (added, or unfrozen) starts from a zero moment, as phi does
        previous = flatten(
            [
                s["metric_root_moment"] if "metric_root_moment" in s else torch.zeros_like(p)
                for p, s in zip(engine.params, states)
            ],
            gradient.dtype,
        )
        count = 1 + max((int(s["metric_count"]) for s in states if "metric_count" in s), default=0)
        root = self.metric.updated_root_moment(previous, gradient)
        scaling = self.metric.scaling(root, count, [p.numel() for p in engine.params])
        return metric_system(system, engine.params, scaling, per_tensor=self.metric.per_tensor), (root, count)

    @torch.no_grad()
    def _decay(self, before: list[Tensor], lr: float) -> None:
        """``w <- w - lr * wd * w_before``: the decoupled decay of an accepted step, from the
        parameters before it (so the step is ``(1 - lr wd) w - lr phi`` as without a damping rule)."""
        old = {id(p): b for p, b in zip(self.engine.params, before)}
        for group in self.param_groups:
            if group["weight_decay"]:
                for p in group["params"]:
                    if id(p) in old:
                        p.sub_(old[id(p)], alpha=lr * group["weight_decay"])

    def _without_ddp_sync(self, closure: Closure) -> Closure:
        """``closure`` run under DDP's ``no_sync()``: no gradient all-reduce is prepared."""
        if not isinstance(self.model, DistributedDataParallel):
            return closure
        model = self.model

        def unsynced(*rows: slice) -> Any:
            with model.no_sync():
                return closure(*rows)

        return unsynced

    def _total(self, fn: Callable[[], tuple[float, ...]], width: int) -> Tensor:
        """``fn()`` summed over the ranks in exact mode (errors raised on every rank), else as is."""
        if self.distributed == "exact":
            return self.communicator.total(fn, width)
        return torch.tensor([float(v) for v in fn()], dtype=torch.float64, device="cpu")

    def _subset(self) -> int | None:
        """The damping rule's ``subset`` (samples re-evaluated for the gain ratio), or ``None``."""
        return getattr(self.damping, "subset", None)

    def _momentum_count(self) -> int:
        """``t - 1``: the accepted momentum steps since ``phi`` last started from zero (kept only
        with ``bias_correction``; state saved without it counts from 0)."""
        count = self.state.get(self.engine.params[0], {}).get("momentum_count")
        return 0 if count is None else int(count)

    def _momentum_buffers(self) -> list[Tensor] | None:
        """``phi_{t-1}`` per parameter, or ``None`` before the first step (``phi_0 = 0``)."""
        buffers = [self.state.get(p, {}).get("momentum_buffer") for p in self.engine.params]
        if all(b is None for b in buffers):
            return None
        # a parameter new to the steps (added, or unfrozen) starts from phi = 0, the others keep theirs
        return [torch.zeros_like(p) if b is None else b for p, b in zip(self.engine.params, buffers)]

    @torch.no_grad()
    def _adapt_damping(
        self,
        closure: Closure,
        result: GramGaussNewtonStep,
        backup: list[Tensor],
        diagnostics: StepDiagnostics,
        general: LossClosure | None,
    ) -> StepDiagnostics:
        """Gain ratio on the same batch (the union batch in exact mode); the rule's new ``alpha``;
        undo the step if it rejects it.

        Any error while re-evaluating or deciding restores the parameters before it propagates.
        """
        try:
            measures = getattr(self.damping, "measures", None)  # optional in the protocol
            measure = measures(diagnostics) if measures else getattr(self.damping, "measures_gain_ratio", True)
            if not measure:
                decision = self.damping.update(diagnostics.alpha, None, diagnostics)
            else:
                diagnostics = self._measure(closure, result, diagnostics, general)
                decision = self.damping.update(diagnostics.alpha, diagnostics.gain_ratio, diagnostics)
        except BaseException:
            restore_parameters(self.engine.params, backup)
            raise
        self.last_gain_ratio = diagnostics.gain_ratio
        for group in self.param_groups:
            group["alpha"] = decision.alpha
        if not decision.accept:
            restore_parameters(self.engine.params, backup)
        self.rejections_in_a_row = 0 if decision.accept else self.rejections_in_a_row + 1
        return replace(diagnostics, rejected=not decision.accept)

    def _measured_rows(self, result: GramGaussNewtonStep) -> slice | None:
        """The rows the gain ratio is measured on: the rule's ``subset`` (the batch's first rows),
        or ``None`` (all of them) where there is none, it covers the batch, or the model predicts
        no decrease on it. The step lowers the batch's predicted loss, not each sample's: on a few
        samples the prediction can be a rise, and the ratio's sign rule would judge the step by
        their change alone (and reject it when their loss rose as predicted)."""
        b = result.residuals.shape[0]
        subset = self._subset()
        if subset is None or subset >= b:
            return None
        rows = slice(0, subset)
        change = None if result.change is None else result.change.reshape(b, -1)[rows]
        decrease = predicted_decrease(result.residuals[rows], result.predicted.reshape(b, -1)[rows], change)
        return rows if decrease > 0 else None

    @torch.no_grad()
    def _measure(
        self, closure: Closure, result: GramGaussNewtonStep, diagnostics: StepDiagnostics, general: LossClosure | None
    ) -> StepDiagnostics:
        """Re-evaluate the batch (the union batch in exact mode; its first ``subset`` rows under a
        rule with a ``subset``, :meth:`_measured_rows`): diagnostics with the loss after the step and
        the gain ratio.

        The gain ratio restricted to rows ``S`` is exact for them: the loss, ``sum_i l_i``, and the
        decrease the model predicts, ``1/2 (||u_i||^2 - ||u_i - (B^T J phi)_i||^2)`` (for the square
        loss ``||r_i||^2 - ||r_i - (J phi)_i||^2``), are sums over samples ``i``."""
        b = result.residuals.shape[0]
        rows = self._measured_rows(result)
        before_rows = result.residuals if rows is None else result.residuals[rows]  # (s, q): r or u
        predicted = result.predicted.reshape(b, -1)
        predicted = predicted if rows is None else predicted[rows]
        if general is not None:
            per_sample = general.per_sample if rows is None else general.per_sample[rows]
            change = None if result.change is None else result.change.reshape(b, -1)
            change = change if rows is None or change is None else change[rows]
            before = float(self._total(lambda: (per_sample.double().sum(),), 1))
            after = float(self._total(lambda: (general.loss_sum(rows),), 1))
            rho = loss_gain_ratio(before, after, predicted_decrease(before_rows, predicted, change))
            loss_after = after / before_rows.shape[0]
        else:
            call = closure if rows is None else functools.partial(closure, rows)
            dtype = params_dtype(self.engine.params)  # as the step's residuals (autocast: widened)
            if self.distributed == "exact":  # the union batch's residuals, in rank order
                new_residuals = self.communicator.gather(lambda: reevaluated_residuals(call, dtype).reshape(-1))
            else:
                new_residuals = reevaluated_residuals(call, dtype)
            if new_residuals.numel() != before_rows.numel():
                raise ValueError("closure returned residuals of a different shape when re-evaluated")
            before, model, after = squared_sums(before_rows, predicted, new_residuals)  # one synchronisation
            rho = loss_gain_ratio(before, after, before - model)
            loss_after = after / new_residuals.numel()
        return replace(diagnostics, loss_after=loss_after, gain_ratio=rho)


def _check_saved_groups(state_dict: Mapping[str, Any]) -> None:
    """Refuse a ``state_dict`` whose param groups lack GGN's hyper-parameters (``lr`` may be
    missing: saved before it existed): another optimizer's, which torch would load in place of
    ours and the next step fail on (``KeyError: 'lam'``)."""
    for i, group in enumerate(state_dict.get("param_groups", [])):
        missing = [key for key in ("lam", "alpha", "weight_decay", "momentum") if key not in group]
        if missing:
            raise ValueError(
                f"the state_dict's param group {i} has no {', '.join(map(repr, missing))} (the state_dict of "
                "another optimizer?); nothing was loaded"
            )


def _check_state_shapes(state_dict: Mapping[str, Any], groups: list[dict[str, Any]]) -> None:
    """Refuse a ``state_dict`` whose per-parameter tensors (``phi``, a metric's moment) do not
    have their parameter's shape: a state saved from another model with as many tensors, which
    torch would load and the next step fail on. Group and parameter counts are torch's check."""
    saved_groups = state_dict.get("param_groups", [])
    if len(saved_groups) != len(groups):
        return
    for saved, group in zip(saved_groups, groups):
        if len(saved["params"]) != len(group["params"]):
            return
        for index, p in zip(saved["params"], group["params"]):
            for key, value in state_dict.get("state", {}).get(index, {}).items():
                if isinstance(value, Tensor) and value.dim() > 0 and value.shape != p.shape:
                    raise ValueError(
                        f"the state_dict's {key!r} of parameter {index} has shape {tuple(value.shape)}, the "
                        f"parameter {tuple(p.shape)} (a state saved from another model?); nothing was loaded"
                    )


@contextlib.contextmanager
def _hooks_held(optimizer: Optimizer, attribute: str) -> Iterator[list[Callable[..., Any]]]:
    """Within it, ``optimizer``'s hooks of ``attribute`` (e.g. ``"_optimizer_state_dict_post_hooks"``)
    are taken off, so that torch's method does not run them; yields them to be run by hand."""
    hooks = getattr(optimizer, attribute)
    setattr(optimizer, attribute, OrderedDict())
    try:
        yield list(hooks.values())
    finally:
        setattr(optimizer, attribute, hooks)


def _check_group_params(params: list[Any]) -> None:
    """Refuse what torch accepts but the joint solve cannot use: a parameter listed twice (torch
    warns; its Jacobian columns would count twice) and a complex parameter."""
    tensors = [p[1] if isinstance(p, tuple) else p for p in params]  # torch's (name, parameter) too
    if len({id(p) for p in tensors}) != len(tensors):
        raise ValueError(
            "a parameter appears more than once in a param group (its Jacobian columns would count twice); "
            "list each once, e.g. list(dict.fromkeys(params))"
        )
    if any(isinstance(p, Tensor) and p.is_complex() for p in tensors):
        raise ValueError(
            "GramGaussNewton does not support complex parameters; keep a real one, "
            "nn.Parameter(torch.view_as_real(c)), and use torch.view_as_complex(p) in the forward pass"
        )


def _takes_rows(closure: Closure) -> bool:
    """Whether ``closure`` can be called with one positional argument (the ``rows`` to evaluate)."""
    try:
        inspect.signature(closure).bind(slice(0, 1))
    except (TypeError, ValueError):  # no such parameter, or no signature to read
        return False
    return True


def _diagnostics(result: GramGaussNewtonStep, lam: float, momentum: float) -> StepDiagnostics:
    """The cheap scalars of a computed step (before any re-evaluation).

    The predicted decrease is in the units of ``result.loss``: the mean squared residual, or for
    a general loss the mean of ``l_i`` (half the decrease of ``||u||^2``, per sample).
    """
    if result.mean_loss is None:  # both means in one reduction and one synchronisation
        pair = torch.stack([result.residuals.reshape(-1), result.predicted.reshape(-1)])
        loss_before, loss_predicted = pair.double().pow(2).mean(1).tolist()
        decrease = loss_before - loss_predicted
    else:
        loss_before = float(result.mean_loss)
        decrease = predicted_decrease(result.residuals, result.predicted, result.change) / result.residuals.shape[0]
    info = result.solve_info
    return StepDiagnostics(
        loss_before=loss_before,
        loss_after=None,
        predicted_decrease=decrease,
        gain_ratio=None,
        alpha=result.alpha,
        lam=lam,
        momentum=momentum,
        jitter=info.jitter,
        solve_method=info.method,
        solve_space=result.solve_space,
        condition=info.condition,
        step_norm=result.direction_norm,
        acceleration_ratio=result.acceleration_ratio,
    )


def _acceleration(
    value: bool | GeodesicAcceleration, loss: Loss, distributed: str | None
) -> GeodesicAcceleration | None:
    """The optimizer's :class:`~gramnewton.update.GeodesicAcceleration` (``None``: off)."""
    if value is False:
        return None
    if value is not True and not isinstance(value, GeodesicAcceleration):
        raise ValueError(f"Invalid geodesic_acceleration: {value!r} (must be True, False or a GeodesicAcceleration)")
    if not isinstance(loss, SquaredError):
        raise ValueError("geodesic_acceleration needs the square loss (loss='mse')")
    if distributed is not None:
        raise ValueError("geodesic_acceleration is not supported with distributed training")
    return GeodesicAcceleration() if value is True else value


def _check_hyper(lam: float, alpha: float, weight_decay: float, momentum: float, lr: float) -> None:
    check_damping(lam, alpha)
    if not is_number(weight_decay) or not 0 <= weight_decay < 1:
        raise ValueError(f"Invalid weight_decay value: {weight_decay!r} (must be a number in [0, 1))")
    if not is_number(lr) or not 0 <= lr < math.inf or lr * weight_decay >= 1:
        raise ValueError(f"Invalid lr value: {lr!r} (must be a finite number >= 0, with lr * weight_decay < 1)")
    check_momentum(momentum)
