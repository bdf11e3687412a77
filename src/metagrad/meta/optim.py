"""The MetaGrad optimizer: quantized gradients corrected by a hypernetwork trained on the task loss.

For the weights that enter the model's quantized products ("meta" weights), iteration ``t`` runs

    W_t = W_{t-1} - lr * refine(H_phi(g_{t-1}, W_{t-1}))
    L_t = loss(f(x_t; W_t)),   backward -> dL_t/dphi (through W_t) and g_t = dL_t/dW_t

with ``W_{t-1}``, ``g_{t-1}`` and the base rule's state held constant, ``refine`` the base rule
(SGD with momentum/Nesterov/weight decay, or Adam) written with differentiable ops, and ``g_t``
the gradient of the quantized backward pass. ``phi`` then takes a step of its own optimizer and
``W_t`` is committed. Every other trainable parameter (biases, batch norm, full-precision layers)
takes a plain base-rule step on its ``.grad``.

The meta weights lag one step: the first ``step`` only records ``g_0``, so after ``n`` steps they
have taken ``n - 1`` updates while the other parameters have taken ``n``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer

from metagrad import kernels
from metagrad.meta import sharded
from metagrad.meta.chunking import auto_chunk_size, check_chunk_size
from metagrad.meta.closure import Closure, run_swapped
from metagrad.meta.horizon import WINDOW_KEYS, detach, slide, unroll
from metagrad.meta.hyper import DEFAULT_KIND, Hypernet, create_hypernet
from metagrad.meta.timing import HyperTimer
from metagrad.meta.updates import BaseState, check_settings, get_base_rule, rule_settings
from metagrad.meta.wrapped import adopt_ddp_wrapper
from metagrad.nn.layers import quantized_weights
from metagrad.parallel.comm import COMM_BITS
from metagrad.parallel.fsdp import shard_group

_NO_META = (
    "MetaGrad needs a model with quantized layers (their weights are what the hypernetwork "
    "updates) and this one has none: call metagrad.quantize_(model, config) first",
    "MetaGrad needs trainable quantized weights, and every weight of this model's quantized "
    "layers has requires_grad=False",
)


def meta_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable weights that enter the model's quantized products (each once)."""
    return [w for _, w in quantized_weights(model) if w.requires_grad]


class MetaGrad(Optimizer):
    """MetaGrad: a base rule (SGD or Adam) whose quantized-layer updates pass through a hypernet.

    Args:
        model: the model; the weights that enter its quantized products (those of quantized
            convolutions, linear layers and attention projections:
            :func:`~metagrad.nn.layers.quantized_weights`) are the meta weights, every other
            trainable parameter takes plain base-rule steps. A model without trainable meta
            weights (not converted by ``metagrad.quantize_``) raises ``ValueError``.
        lr: learning rate (read from the param groups at every step, so schedulers work).
        base: a registered base rule (:mod:`metagrad.meta.updates`): ``"sgd"`` or ``"adam"``.
        momentum, nesterov, weight_decay: as ``torch.optim.SGD`` (``weight_decay`` also for Adam,
            as L2 added to the gradient like ``torch.optim.Adam``); ``momentum`` and
            ``nesterov`` are SGD's only.
        betas, eps: as ``torch.optim.Adam`` (Adam's only). A setting the base rule does not
            read (``BaseRule.settings``) raises ``ValueError``; one not given takes
            ``torch.optim``'s default.
        hypernet: a :class:`~metagrad.meta.hyper.Hypernet` or any module with its ``forward``
            signature (default ``create_hypernet("grad+weight")``, in float64 for a float64
            model); moved to the meta weights' device.
        hyper_optimizer: optimizer of the hypernetwork's parameters (default ``Adam`` with
            ``hyper_lr``).
        hyper_lr: learning rate of the default hyper optimizer (Adam). MetaQuant used 1e-3; on
            CIFAR-10 that made MetaGrad diverge within two epochs, 1e-4 did not.
        chunk_size: weight elements per hypernetwork chunk (``None``: no chunking);
            ``"auto"``: on CUDA unchunked when the activations of the largest layer fit in
            a share of the free memory (else chunks that do), on CPU cache-sized chunks
            (:mod:`metagrad.meta.chunking`). A fused hypernetwork (compiled kernels, see
            :mod:`metagrad.meta.hyper`) holds no activations and ignores it.
        skip_nonfinite: skip steps whose loss or gradients are not finite (see below).
        comm_bits: bits of the gradient all-reduce when ``model`` is DDP-wrapped (see below).
        horizon: ``K``, the number of updates the hypernetwork is trained through (see below).

    ``step(closure)`` needs a closure that calls ``zero_grad()``, runs ``model(x)``, calls
    ``loss.backward()`` and returns the loss. Inside the closure the meta weights are replaced by
    ``W_t``; batch-norm statistics and other buffers update in place as usual. The gradients
    seen inside the closure after ``backward`` (``model.parameters()`` yields ``W_t`` there, with
    ``g_t`` on its ``.grad``) are the ones kept, so ``clip_grad_norm_(model.parameters(), c)``
    before returning the loss clips ``g_t`` like any other gradient.

    Param groups: the meta weights are in groups with ``"meta": True`` (``param_groups[0]`` at
    construction), every other parameter in groups with ``"meta": False``;
    :meth:`add_param_group` works as in ``torch.optim``. A parameter whose ``requires_grad`` is
    False at a step is left alone. After ``step`` a meta weight's ``.grad`` is the very tensor
    the next step will pass through the hypernetwork (:meth:`pending_gradients`): changing it in
    place (e.g. clipping it) changes that update.

    Non-finite steps: with ``skip_nonfinite`` (default) a step whose loss or gradients (model or
    hypernetwork) are not finite changes nothing: no weight, state or hypernetwork update, the
    pending gradients are kept for the next step. ``last_step_skipped`` says whether the last
    step was skipped, ``skipped_steps`` counts them (a ``GradScaler``-like policy).

    Horizon: with ``horizon=K > 1`` the hypernetwork is trained on the loss after its last ``K``
    updates rather than the last one. Each meta weight keeps an anchor (its weights, base-rule
    and hypernet state ``K`` updates back) and the ``K`` gradients recorded since; every step
    recomputes ``W_t`` from the anchor through those ``K`` updates with the current
    hypernetwork, so ``dL_t/dphi`` flows through all of them (and through the momentum buffer
    between them). The gradients and the hypernetwork's input weights are data, as with
    ``K = 1``: the derivative through the weights the hypernetwork reads is truncated. Memory
    is ``K + 2`` weight-sized tensors per meta weight (recomputation instead of ``K`` stored
    graphs); the hypernetwork runs ``K`` times a step. An update leaves the window, and its
    result becomes the anchor, ``K`` steps after its gradient was recorded. ``K = 1`` is the
    method described above, computed by the same code as before the option existed.

    Distributed: given a ``DistributedDataParallel`` model, MetaGrad averages the gradients over
    the ranks itself (DDP's reducer cannot see ``W_t``): the model's gradients (``comm_bits``:
    32, 16 for bfloat16, 8 or 4 for :func:`~metagrad.parallel.comm.quantized_all_reduce_mean`),
    before they become the pending gradients the hypernetwork sees, and the hypernetwork's own
    gradients in float32; rank 0's buffers (batch-norm statistics) are broadcast before each
    forward as DDP does, and rank 0's hypernetwork at construction. Every rank applies the same
    update. Given the inner module instead (as Lightning's DDP strategy does), it adopts at the
    first step the wrapper the closure calls, and then does the same
    (:mod:`metagrad.meta.wrapped`). Given an FSDP2-sharded model (``fully_shard`` on its
    blocks and root, e.g. :func:`~metagrad.parallel.fsdp.shard_model`), the hypernetwork runs on
    each rank's shards with whole-layer statistics (:mod:`metagrad.meta.sharded`); its state
    and :meth:`pending_gradients` are then shard-local, :meth:`state_dict` holds DTensors.

    ``hyper_time`` accumulates seconds spent on the hypernetwork: its forward and the refined
    update, its backward (timed from autograd hooks) and its optimizer's step.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float,
        *,
        base: str = "sgd",
        momentum: float | None = None,
        nesterov: bool | None = None,
        weight_decay: float | None = None,
        betas: tuple[float, float] | None = None,
        eps: float | None = None,
        hypernet: Hypernet | nn.Module | None = None,
        hyper_optimizer: Optimizer | None = None,
        hyper_lr: float = 1e-4,
        chunk_size: int | str | None = "auto",
        skip_nonfinite: bool = True,
        comm_bits: int = 32,
        horizon: int = 1,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        given = dict(momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
        settings = rule_settings(base, {**given, "betas": betas, "eps": eps})  # base: known?
        check_settings(lr, **settings, hyper_lr=hyper_lr)
        check_chunk_size(chunk_size)
        if comm_bits not in COMM_BITS:
            raise ValueError(f"comm_bits must be one of {COMM_BITS}, got {comm_bits!r}")
        if isinstance(horizon, bool) or not isinstance(horizon, int) or horizon < 1:
            raise ValueError(f"horizon must be an integer >= 1, got {horizon!r}")
        self.horizon = horizon
        self.model = model
        self._ddp = model if isinstance(model, DistributedDataParallel) else None
        self._shards = shard_group(model)  # FSDP2: the group the weights are sharded over
        if self._shards is not None and comm_bits != 32:
            raise ValueError(
                f"comm_bits={comm_bits} applies to DDP; under FSDP2 the gradients are "
                "reduce-scattered by FSDP (its MixedPrecisionPolicy sets their dtype)"
            )
        self._names = {id(p): name for name, p in model.named_parameters()}
        meta = meta_parameters(model)
        if not meta:
            raise ValueError(_NO_META[bool(quantized_weights(model))])
        if self._shards is not None:
            sharded.check_sharded(model)
        meta_ids = {id(p) for p in meta}
        rest = [p for p in model.parameters() if p.requires_grad and id(p) not in meta_ids]
        defaults = dict(lr=lr, **{**settings, "betas": tuple(settings["betas"])})
        groups = [{"params": meta, "meta": True}, {"params": rest, "meta": False}]
        super().__init__(groups, defaults)
        self.base = base
        self.comm_bits = comm_bits
        self.skip_nonfinite = skip_nonfinite
        self.skipped_steps = 0
        self.last_step_skipped = False
        if hypernet is None:
            hypernet = create_hypernet(DEFAULT_KIND)
            if meta and meta[0].dtype == torch.float64:
                hypernet = hypernet.double()
        if meta:
            hypernet = hypernet.to(meta[0].device)
        self.hypernet = hypernet
        group = self._ddp.process_group if self._ddp is not None else self._shards
        if group is not None:  # every rank starts from rank 0's hypernetwork
            from metagrad.parallel.distributed import broadcast_tensors_

            broadcast_tensors_([*hypernet.parameters(), *hypernet.buffers()], group=group)
        self.chunk_size = auto_chunk_size(meta, hypernet) if chunk_size == "auto" else chunk_size
        if hyper_optimizer is None:
            hyper_optimizer = torch.optim.Adam(hypernet.parameters(), lr=hyper_lr)
        self.hyper_optimizer = hyper_optimizer
        self.hyper_time = 0.0

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group, as ``torch.optim`` does; ``"meta"`` says how its params are updated.

        Without a ``"meta"`` key, the weights of the model's quantized layers in the group form
        a meta group and the other params a plain one (two groups if it holds both). A meta
        group's params must be parameters of the model (the step swaps them by name).
        """
        group = dict(param_group)
        params = group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        if "meta" not in group:
            quantized = {id(p) for p in meta_parameters(self.model)}
            meta = [p for p in params if id(p) in quantized]
            rest = [p for p in params if id(p) not in quantized]
            for flag, members in ((True, meta), (False, rest)):
                if members or (not meta and not rest and not flag):
                    self.add_param_group({**group, "params": members, "meta": flag})
            return
        group["meta"] = bool(group["meta"])
        if group["meta"]:
            unknown = [tuple(p.shape) for p in params if id(p) not in self._names]
            if unknown:
                raise ValueError(
                    f"meta params must be parameters of the model given to MetaGrad; "
                    f"{len(unknown)} are not (shapes {unknown[:3]})"
                )
        super().add_param_group({**group, "params": params})

    # -- parameters ---------------------------------------------------------------------------

    @property
    def meta_params(self) -> list[Tensor]:
        """The meta weights (the params of the groups with ``"meta": True``)."""
        return [p for g in self.param_groups if g["meta"] for p in g["params"]]

    def pending_gradients(self) -> dict[Tensor, Tensor]:
        """The quantized gradient ``g_t`` each meta weight will be updated with at the next step."""
        return {
            p: self.state[p]["pending_grad"]
            for p in self.meta_params
            if "pending_grad" in self.state.get(p, {})
        }

    @torch.no_grad()
    def corrected_gradients(
        self, grads: Mapping[Tensor, Tensor] | None = None
    ) -> dict[Tensor, Tensor]:
        """``H(g, W)`` per parameter, without graph or state change (for diagnostics).

        ``grads`` maps parameters to gradients (default: :meth:`pending_gradients`, giving the
        corrected gradients the next step will refine). Recurrent hypernetworks use each layer's
        current state. Parameters that are not meta weights are returned unchanged.
        """
        grads = self.pending_gradients() if grads is None else grads
        meta = set(self.meta_params)
        out = {}
        for p, g in grads.items():
            if p in meta:
                hyper_state = self.state[p].get("hyper_state") if p in self.state else None
                with sharded.statistics_over(self._shards):
                    out[p], _ = self.hypernet(
                        sharded.local(g).detach(),
                        sharded.local(p).detach(),
                        hyper_state,
                        chunk_size=self.chunk_size,
                    )
            else:
                out[p] = g
        return out

    # -- step ---------------------------------------------------------------------------------

    def step(self, closure: Closure | None = None) -> Tensor:  # type: ignore[override]
        """One MetaGrad iteration with the required ``closure`` (see the class docs); its loss."""
        if closure is None:
            raise TypeError(
                "MetaGrad.step() requires a closure that calls zero_grad(), computes the loss "
                "with model(x), calls loss.backward() and returns the loss"
            )
        meta_groups = [g for g in self.param_groups if g["meta"]]
        rest_groups = [g for g in self.param_groups if not g["meta"]]
        timer = HyperTimer(self.hypernet)
        device_type = self.meta_params[0].device.type if self.meta_params else "cpu"
        kept: dict[Tensor, Tensor] = {}
        with torch.enable_grad():
            start = time.perf_counter()
            with (
                torch.autocast(device_type, enabled=False),  # the hypernet runs in float32
                sharded.statistics_over(self._shards),  # per-layer statistics of whole layers
            ):
                proposals = {}
                for group in meta_groups:
                    proposals.update(self._propose(group))
            timer.elapsed += time.perf_counter() - start
            if self._shards is not None:
                loss, new_grads, seconds = sharded.run_closure(
                    closure, proposals, self.hypernet, self._shards, kept, self.skip_nonfinite
                )
                timer.elapsed += seconds
            else:
                with adopt_ddp_wrapper(self):  # a DDP wrapper of the model, in the closure
                    loss, new_grads = self._run_closure(closure, proposals, timer)
        with torch.no_grad():
            rest = [p for g in rest_groups for p in g["params"] if p.grad is not None]
            if self._ddp is not None:
                self._average(new_grads, rest, bool(proposals))
            self.last_step_skipped = self.skip_nonfinite and not self._finite(
                loss, new_grads, rest, bool(proposals)
            )
            if self.last_step_skipped:
                for p, shard in kept.items():  # sharded: W_t was written before the closure
                    sharded.local(p).copy_(shard)
                self._discard(rest)
                self.skipped_steps += 1
                self.hyper_time += timer.total()
                return loss
            start = time.perf_counter()
            if proposals:
                self.hyper_optimizer.step()
            timer.elapsed += time.perf_counter() - start
            for group in meta_groups:
                self._commit(group, proposals, new_grads)
            for group in rest_groups:
                self._plain_steps(group)
        self.hyper_time += timer.total()
        return loss

    def _propose(self, group: dict[str, Any]) -> dict[Tensor, tuple[Tensor, BaseState, tuple]]:
        """``W_t``, the base state and the hypernet state for each meta weight with a pending g.

        A weight frozen since the last step (``requires_grad`` False) is left out and its
        pending gradient dropped.
        """
        update = get_base_rule(self.base).update
        proposals = {}
        for p in group["params"]:
            state = self.state[p]
            if not p.requires_grad:
                for key in ("pending_grad", *WINDOW_KEYS):
                    state.pop(key, None)
                continue
            if "pending_grad" not in state:
                continue
            if self.horizon > 1:
                rule = get_base_rule(self.base)
                proposals[p] = unroll(state, group, self.hypernet, rule, self.chunk_size)
                continue
            w = sharded.local(p).detach()
            corrected, hyper_state = self.hypernet(
                state["pending_grad"], w, state.get("hyper_state"), chunk_size=self.chunk_size
            )
            new_w, base_state = update(w, corrected, state, group)
            if not new_w.requires_grad:  # a frozen hypernet: still collect g_t
                new_w = new_w.detach().requires_grad_()
            proposals[p] = (new_w, base_state, hyper_state, None)
        return proposals

    def _run_closure(
        self, closure: Closure, proposals: Mapping[Tensor, tuple], timer: HyperTimer
    ) -> tuple[Tensor, dict[Tensor, Tensor]]:
        """The closure with ``W_t`` swapped in (:func:`~metagrad.meta.closure.run_swapped`)."""
        sync = self._ddp.no_sync() if self._ddp is not None else nullcontext()
        if self._ddp is not None and self._ddp.broadcast_buffers:
            from metagrad.parallel.distributed import broadcast_tensors_

            broadcast_tensors_(list(self._ddp.module.buffers()), group=self._ddp.process_group)
        if not proposals:
            with sync:
                return closure(), {}
        with sync:
            return run_swapped(self.model, self._names, closure, proposals, timer)

    def _average(self, new_grads: dict[Tensor, Tensor], rest: list[Tensor], hyper: bool) -> None:
        """Average the step's gradients across the DDP ranks (``comm_bits`` for the model's)."""
        from metagrad.parallel.comm import all_reduce_mean_

        group = self._ddp.process_group if self._ddp is not None else None
        meta = [p.grad for p in self.meta_params if p.grad is not None and p not in new_grads]
        model_grads = [*new_grads.values(), *meta, *(p.grad for p in rest)]
        all_reduce_mean_(model_grads, bits=self.comm_bits, group=group)
        if hyper:
            hyper_grads = [q.grad for q in self.hypernet.parameters() if q.grad is not None]
            all_reduce_mean_(hyper_grads, bits=32, group=group)

    def _finite(
        self, loss: Tensor, new_grads: Mapping[Tensor, Tensor], rest: list[Tensor], hyper: bool
    ) -> bool:
        """Whether the loss and every gradient of the step are finite (on every rank)."""
        tensors = [*new_grads.values(), *(p.grad for p in rest)]
        tensors += [p.grad for p in self.meta_params if p.grad is not None and p not in new_grads]
        if hyper:
            tensors += [q.grad for q in self.hypernet.parameters() if q.grad is not None]
        if isinstance(loss, Tensor):
            tensors.append(loss.detach())
        finite = kernels.all_finite([sharded.local(t) for t in tensors]).float()
        group = self._ddp.process_group if self._ddp is not None else self._shards
        if group is not None:
            import torch.distributed as dist

            dist.all_reduce(finite, op=dist.ReduceOp.MIN, group=group)
        return bool(finite.item())

    def _discard(self, rest: list[Tensor]) -> None:
        """Forget a skipped step: no update, pending gradients kept, gradients released."""
        for p in rest:
            p.grad = None
        self.hypernet.zero_grad(set_to_none=True)
        for p in self.meta_params:
            pending = self.state[p].get("pending_grad") if p in self.state else None
            p.grad = None if pending is None else sharded.like_param(p, pending)

    def _commit(
        self,
        group: dict[str, Any],
        proposals: Mapping[Tensor, tuple],
        new_grads: Mapping[Tensor, Tensor],
    ) -> None:
        """Write ``W_t`` and the new states; keep ``g_t`` as the pending gradient."""
        for p in group["params"]:
            state = self.state[p]
            first = None
            if p in proposals:
                new_w, base_state, hyper_state, first = proposals[p]
                state.update({k: detach(v) for k, v in base_state.items()})
                if hyper_state:
                    state["hyper_state"] = tuple(s.detach() for s in hyper_state)
                if self._shards is None:  # (sharded: W_t and g_t are in place already)
                    p.copy_(new_w)
                    grad = new_grads.get(p)
                    p.grad = None if grad is None else grad.detach()
            grad = sharded.local(p.grad) if p.requires_grad and p.grad is not None else None
            if grad is None:
                for key in ("pending_grad", *WINDOW_KEYS):
                    state.pop(key, None)
            else:
                state["pending_grad"] = grad  # the very tensor on p.grad (its shard)
                if self.horizon > 1:
                    rule = get_base_rule(self.base)
                    slide(sharded.local(p), state, grad, first, self.horizon, rule)

    def _plain_steps(self, group: dict[str, Any]) -> None:
        update = get_base_rule(self.base).update
        for p in group["params"]:
            if p.grad is None or not p.requires_grad:
                continue
            state = self.state[p]
            param = sharded.local(p)
            new_p, base_state = update(param, sharded.local(p.grad), state, group)
            param.copy_(new_p)
            state.update(base_state)

    # -- bookkeeping --------------------------------------------------------------------------

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients of the model's parameters and of the hypernetwork.

        A meta weight's ``.grad`` is its pending gradient (the same tensor): it is released
        (set to None), never zeroed in place, whatever ``set_to_none`` says.
        """
        for p in self.meta_params:
            p.grad = None
        super().zero_grad(set_to_none)
        self.hypernet.zero_grad(set_to_none)

    def state_dict(self) -> dict[str, Any]:
        """Base-rule state, pending gradients, hypernet states, the hypernet and its optimizer."""
        state = super().state_dict()
        if self._shards is not None:  # shard-shaped state as DTensors (for DCP)
            params = [p for g in self.param_groups for p in g["params"]]
            state["state"] = {i: sharded.to_global(params[i], s) for i, s in state["state"].items()}
        state["base"] = self.base
        state["hypernet"] = self.hypernet.state_dict()
        state["hyper_optimizer"] = self.hyper_optimizer.state_dict()
        return state

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        state_dict = dict(state_dict)
        base = state_dict.pop("base", self.base)
        if base != self.base:
            raise ValueError(f"state_dict is from a {base!r} MetaGrad, this one is {self.base!r}")
        hypernet = state_dict.pop("hypernet", None)
        hyper_optimizer = state_dict.pop("hyper_optimizer", None)
        super().load_state_dict(state_dict)
        for p, s in self.state.items():  # a sharded run's state, whole or in shards
            self.state[p] = sharded.to_local_state(p, s)
        if hypernet is not None:
            self.hypernet.load_state_dict(hypernet)
        if hyper_optimizer is not None:
            self.hyper_optimizer.load_state_dict(hyper_optimizer)
