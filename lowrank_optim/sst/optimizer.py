r"""``SSTAdamW``: AdamW with Sparse Spectral Training (arXiv 2405.15481) for the SST layers it is given.

Build it over a model converted by :func:`~lowrank_optim.sst.convert.convert_to_sst`::

    model = convert_to_sst(model, rank=64)
    optimizer = SSTAdamW(model.parameters(), lr=1e-3)

It recognises each SST layer by its ``s``, ``U_active`` and ``V_active`` parameters
(:mod:`~lowrank_optim.sst.partition`; all three must be in the same parameter group); every
other parameter gets plain AdamW (:func:`lowrank_optim.plain_adamw.plain_adamw_step_`, the
``torch.optim.AdamW`` arithmetic).

Errors are raised before anything changes: bad gradients (sparse, complex, an SST layer with only
some of its gradients) on every step, and non-finite SST gradients on a step that ends in a resample
(they would reach the re-SVD and the sampling). ``skip_nonfinite=True`` instead checks every gradient
once per step and skips the whole step, schedule included (counted in ``skipped_steps``, warned).
"""

from __future__ import annotations

import math
import warnings

import torch
from torch.distributed.tensor import DTensor
from torch.optim import Optimizer

from ..adam_form import AdamForm
from ..finite import all_finite
from ..moments import Moments
from ..plain_adamw import as_float, plain_adamw_step_
from ..quantization import check_moment_bits
from ..registry import register_optimizer
from ..rounding import rounding_generator
from ..state_io import STATE_FORMAT, check_state_format, restore_saved_dtypes
from ..validation import (
    InvalidHyperparameter,
    check_adamw_hyperparameters,
    check_bool,
    check_choice,
    check_group_keys,
    check_positive_int,
)
from ..weight_store import weight_store
from .adam_update import adamw_with_step_counts_
from .layer import SSTLinear
from .parameter_owners import SST_ROLES
from .partition import (
    SSTLayerEntry,
    check_finite_before_resample,
    partition_group,
    sst_parameters,
)
from .resample import resample_layer_
from .sampling import SAMPLING_SCHEMES

_COUNT_KEYS = {"s": "step", "U_active": "column_steps", "V_active": "column_steps"}


class SSTAdamW(Optimizer):
    r"""AdamW where each SST layer trains all singular values and ``r`` sampled singular-vector pairs.

    For each SST layer ``W = U·diag(s)·Vᵀ`` (k singular values, rank r), at every step:

    .. math::
        &s \leftarrow \mathrm{AdamW}(s, \nabla_s L);\quad s \leftarrow \max(s, 0) \\
        &U_a \leftarrow \mathrm{Adam}(U_a, G V_a),\quad V_a \leftarrow \mathrm{Adam}(V_a, G^\top U_a)
          \quad\text{(enhanced gradients, } G = \partial L/\partial W) \\
        &u_j \leftarrow u_j / \lVert u_j\rVert,\quad v_j \leftarrow v_j / \lVert v_j\rVert
          \quad\text{for every active pair } j

    and after every ``update_interval``-th step (resample number ``q``):

    .. math::
        &\text{if } q \bmod R = 0:\; U, s, V \leftarrow \mathrm{svd}(U\,\mathrm{diag}(s)\,V^\top)
          \text{ and the layer's moments restart} \\
        &\text{draw the next } r \text{ active pairs without replacement, } p_i \propto s_i
          \text{ (or } \tfrac12(1/k + s_i/\textstyle\sum s)\text{)}

    ``R`` (``resvd_interval``) defaults to a *round*, ``⌈k/r⌉`` resamples, for each layer. Pairs that
    stay active keep their moments; swapped-in pairs start from zero moments and their learning rate
    ramps up linearly over ``rewarmup_steps`` steps (likewise ``s`` after a re-SVD, and every SST
    tensor at the start). Bias corrections count each pair's own steps
    (:func:`~lowrank_optim.sst.adam_update.adamw_with_step_counts_`).

    Weight decay applies to ``s`` (``W·(1−ηλ)`` is exactly ``s·(1−ηλ)``) and to plain parameters,
    never to the unit singular vectors.

    Args:
        params: parameters or parameter groups, e.g. ``model.parameters()`` of a converted model
            (``model.named_parameters()`` makes error messages name the layers).
        lr, betas, eps, weight_decay: as in ``torch.optim.AdamW``.
        update_interval: steps per iteration, i.e. between resamples (paper: 200).
        resvd_interval: resamples between re-SVDs; ``None``: ``⌈k/r⌉`` for each layer (one round).
        sampling: ``"s"`` (``p ∝ s``, the paper) or ``"mixed"`` (``½(1/k + s/Σs)``).
        rewarmup_steps: linear learning-rate ramp of restarted SST tensors; 0 disables (paper: 20).
        seed: seeds the CPU ``torch.Generator`` of the draws; its state is in :meth:`state_dict`.
        skip_nonfinite: skip any step with a non-finite gradient instead of applying it.

    ``update_interval``, ``resvd_interval``, ``sampling`` and ``rewarmup_steps`` may differ per group;
    the step count driving the schedule is the optimizer's (skipped steps do not count).
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        update_interval: int = 200,
        resvd_interval: int | None = None,
        sampling: str = "s",
        rewarmup_steps: int = 20,
        moment_bits: int | None = None,
        bf16_stochastic_round: bool = False,
        seed: int = 0,
        skip_nonfinite: bool = False,
    ) -> None:
        defaults = dict(  # the keys of SST_GROUP_KEYS
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            update_interval=update_interval,
            resvd_interval=resvd_interval,
            sampling=sampling,
            rewarmup_steps=rewarmup_steps,
            moment_bits=moment_bits,
            bf16_stochastic_round=bf16_stochastic_round,
        )
        _check_group_hyperparameters(defaults)
        _check_non_negative_int("seed", seed)
        check_bool("skip_nonfinite", skip_nonfinite)
        self.skip_nonfinite = skip_nonfinite
        self.skipped_steps = 0
        self._sst_step = 0
        self._generator = torch.Generator(device="cpu")
        self._generator.manual_seed(seed)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        """Add a group after checking its keys, hyperparameters and SST layers; a rejected group is not added."""
        check_group_keys(param_group, self.defaults, type(self).__name__)
        super().add_param_group(param_group)
        group_index = len(self.param_groups) - 1
        try:
            _check_group_hyperparameters(self.param_groups[-1])
            _check_not_sharded(group_index, self.param_groups[-1])
            partition_group(group_index, self.param_groups[-1])
        except ValueError:
            self.param_groups.pop()
            raise

    @torch._disable_dynamo        # eager inside torch.compile, as ProjectedAdamW.step (lowrank_optim.engine)
    @torch.no_grad()
    def step(self, closure=None):
        """One optimization step; after every ``update_interval``-th, resample (and maybe re-SVD).
        ``torch.compile(opt.step)`` runs it eagerly: traced, its Python step counter and sampling
        generator made the compiled trajectory diverge from the eager one."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        partitions = [partition_group(i, group, with_grad=True) for i, group in enumerate(self.param_groups)]
        step = self._sst_step + 1
        if self.skip_nonfinite:
            every = [p for _, plain, _ in partitions for p in plain] + [
                p for _, _, layers in partitions for e in layers if e.has_grad for p in sst_parameters(e.layer)
            ]
            if not all_finite([p.grad for p in every]):
                self.skipped_steps += 1
                warnings.warn(
                    f"SSTAdamW: non-finite gradient, step skipped ({self.skipped_steps} skipped so far)",
                    RuntimeWarning,
                    stacklevel=2,
                )
                return loss
        resampling = [(g, layers) for g, _, layers in partitions if step % g["update_interval"] == 0]
        check_finite_before_resample([e for _, layers in resampling for e in layers if e.has_grad])

        self._sst_step = step
        for group, plain, layers in partitions:
            self._step_plain(group, plain)
            for entry in layers:
                if entry.has_grad:
                    self._step_layer(group, entry.layer)
        for group, layers in resampling:
            self._resample(group, layers, step // group["update_interval"])
        return loss

    def _step_plain(self, group: dict, params: list[torch.Tensor]) -> None:
        generators = [self._rounding(group, p) for p in params]
        plain_adamw_step_(self.state, group, params, [p.grad for p in params], form=AdamForm.TORCH,
                          moment_bits=group["moment_bits"],
                          generators=generators if any(g is not None for g in generators) else None)

    def _step_layer(self, group: dict, layer: SSTLinear) -> None:
        beta1, beta2 = group["betas"]
        for role in SST_ROLES:
            p = getattr(layer, role)
            moments = self._layer_moments(group, p, role)
            counts = moments.state[_COUNT_KEYS[role]]
            counts.add_(1)
            adamw_with_step_counts_(
                p,
                p.grad,
                moments,
                counts,
                lr=as_float(group["lr"]),
                beta1=beta1,
                beta2=beta2,
                eps=group["eps"],
                weight_decay=group["weight_decay"] if role == "s" else 0.0,
                rewarmup_steps=group["rewarmup_steps"],
                optimizer_step=self._sst_step,
                generator=self._rounding(group, p),
            )
        layer.s.clamp_(min=0.0)
        if as_float(group["lr"]) != 0.0:          # an update drifts the columns off unit norm; no update, no drift
            layer.renormalize_active_()

    def _layer_moments(self, group: dict, p: torch.Tensor, role: str) -> Moments:
        """The moments of an SST tensor (created zero on its first step, with int64 step counts:
        one for ``s`` (``"step"``), one per column otherwise); the columns of ``U_active`` and
        ``V_active`` are the slots their quantization blocks follow."""
        state = self.state[p]
        moments = Moments.of(state, p.shape, None if role == "s" else "right", group["moment_bits"])
        if not moments.exists:
            moments.create(p.dtype, p.device, like=p)
            count_shape = () if role == "s" else (p.shape[-1],)
            state[_COUNT_KEYS[role]] = torch.zeros(count_shape, dtype=torch.int64, device=p.device)
        return moments

    def _rounding(self, group: dict, p: torch.Tensor) -> torch.Generator | None:
        """This step's stochastic-rounding generator for an int8 ``p`` (a plain parameter: the SST
        factors are float), or a bf16 one under ``bf16_stochastic_round`` (None otherwise)."""
        if weight_store(p) != "int8" and not (group["bf16_stochastic_round"] and p.dtype == torch.bfloat16):
            return None
        return rounding_generator(f"param{self._param_position(p)}", self._sst_step, p.device)

    def _param_position(self, p: torch.Tensor) -> int:
        """``p``'s position over all param groups (the same in every process and after a resume),
        from a map rebuilt only when a parameter is new to it."""
        positions = self.__dict__.get("_positions")
        if positions is None or id(p) not in positions:
            positions = {id(q): i for i, q in enumerate(q for g in self.param_groups for q in g["params"])}
            self._positions = positions
        return positions[id(p)]

    def _resample(self, group: dict, layers: list[SSTLayerEntry], resample_number: int) -> None:
        for entry in layers:
            layer = entry.layer
            resvd_interval = group["resvd_interval"] or math.ceil(layer.spectral_size / layer.rank)
            try:
                resample_layer_(
                    layer,
                    *(Moments.of(self.state[getattr(layer, role)], getattr(layer, role).shape,
                                 None if role == "s" else "right", group["moment_bits"]) for role in SST_ROLES),
                    generator=self._generator,
                    sampling=group["sampling"],
                    resvd=resample_number % resvd_interval == 0,
                )
            except (RuntimeError, ValueError) as error:  # torch.linalg.LinAlgError included
                raise RuntimeError(
                    f"{entry.label}: resampling failed ({error}); this step's update was applied and "
                    "the layers listed before it were resampled"
                ) from error

    def state_dict(self) -> dict:
        """``torch.optim.Optimizer.state_dict()`` plus ``"sst"``: the schedule's step count and the
        sampling generator's state (a uint8 tensor), so checkpoints load with ``weights_only=True``."""
        state_dict = super().state_dict()
        state_dict["sst"] = {"step": self._sst_step, "generator_state": self._generator.get_state()}
        state_dict["skipped_steps"] = self.skipped_steps
        state_dict["state_format"] = STATE_FORMAT
        return state_dict

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a :meth:`state_dict` this version saved (:func:`~lowrank_optim.state_io.check_state_format`),
        keeping every saved state tensor's dtype.

        ``torch.optim.Optimizer.load_state_dict`` casts every state tensor of a floating parameter to
        the parameter's dtype, the int64 step counts included; they are restored afterwards.
        """
        if "sst" not in state_dict:
            raise ValueError(
                "Invalid state_dict: no 'sst' entry (schedule step and sampling generator state); "
                "it was not saved by SSTAdamW.state_dict()"
            )
        # the constructor's keys: torch's __setstate__ adds "differentiable" to defaults (not to groups)
        check_state_format(state_dict, set(SST_GROUP_KEYS), type(self).__name__)
        state_dict = dict(state_dict)
        sst = state_dict.pop("sst")
        super().load_state_dict(state_dict)
        restore_saved_dtypes(self, state_dict)
        self._sst_step = int(sst["step"])
        self._generator.set_state(sst["generator_state"].cpu())
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_sst_step"] = self._sst_step
        state["skip_nonfinite"] = self.skip_nonfinite
        state["skipped_steps"] = self.skipped_steps
        state["_generator_state"] = self._generator.get_state()
        return state

    def __setstate__(self, state: dict) -> None:
        generator_state = state.pop("_generator_state", None)
        super().__setstate__(state)
        if generator_state is not None:  # unpickling; load_state_dict also calls __setstate__, without it
            self._generator = torch.Generator(device="cpu")
            self._generator.set_state(generator_state)


def _check_group_hyperparameters(group: dict) -> None:
    check_adamw_hyperparameters(group)
    check_positive_int("update_interval", group["update_interval"])
    if group["resvd_interval"] is not None:
        check_positive_int("resvd_interval", group["resvd_interval"])
    check_choice("sampling", group["sampling"], SAMPLING_SCHEMES)
    _check_non_negative_int("rewarmup_steps", group["rewarmup_steps"])
    check_moment_bits(group["moment_bits"])
    check_bool("bf16_stochastic_round", group["bf16_stochastic_round"])


SST_GROUP_KEYS = ("lr", "betas", "eps", "weight_decay", "update_interval", "resvd_interval", "sampling",
                  "rewarmup_steps", "moment_bits", "bf16_stochastic_round")


def _check_non_negative_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidHyperparameter(name, value, f"Invalid {name}: {value!r} (expected an integer >= 0)")


register_optimizer("sst_adamw", SSTAdamW)


def _check_not_sharded(group_index: int, group: dict) -> None:
    """SST resamples and re-SVDs whole factors: FSDP2-sharded (DTensor) parameters are refused."""
    for index, param in enumerate(group["params"]):
        if isinstance(param, DTensor):
            names = group.get("param_names")
            name = names[index] if names else f"param_groups[{group_index}]['params'][{index}]"
            raise ValueError(f"SSTAdamW: parameter {name} is sharded ({param.placements}); SST does not support "
                             "FSDP2-sharded parameters (train it with DDP)")
