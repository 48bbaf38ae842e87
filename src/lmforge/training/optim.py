"""Optimizers (AdamW; Muon + AdamW) and the learning-rate schedules (warmup + cosine or WSD).

Weight decay only regularises the big matmul weights of Linear layers; decaying
norm gains or embeddings hurts LMs (embeddings of rare tokens get pulled to 0).

Muon (torch.optim.Muon, as modded-nanogpt uses it) orthogonalises the momentum of each hidden
matrix; embeddings, output heads (a Linear whose name contains "head"), norms and biases stay with
AdamW. Lightning's automatic optimization drives one optimizer, so the pair is wrapped in
:class:`Chained`, which presents their param groups as one and steps both.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, MutableMapping
from typing import Any

import torch
from torch import nn

from lmforge.training.config import OptimConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Split trainable params into a decay group (2-D Linear weights) and a no-decay group.

    Embedding weights are claimed first, so a weight tied between nn.Embedding and an
    lm_head Linear counts once, as an embedding (no decay). Each Parameter object is
    placed exactly once even if reachable through several modules.
    """
    seen: set[int] = set()
    no_decay_ids: set[int] = set()
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            no_decay_ids.add(id(module.weight))

    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for module in model.modules():
        # recurse=False so each parameter is attributed to its owning module
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            is_linear_weight = isinstance(module, nn.Linear) and name == "weight" and p.ndim >= 2
            if is_linear_weight and id(p) not in no_decay_ids:
                decay.append(p)
            else:
                no_decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def muon_matrices(model: nn.Module) -> list[nn.Parameter]:
    """The hidden matrices Muon takes: 2-D weights of Linear layers that are neither an output head
    (a module name containing "head") nor tied to an embedding."""
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    seen: set[int] = set()
    out: list[nn.Parameter] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or "head" in name.rsplit(".", 1)[-1]:
            continue
        p = module.weight
        if p.requires_grad and p.ndim == 2 and id(p) not in embedding_ids and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def warmup_cosine(step: int, cfg: OptimConfig) -> float:
    """LR multiplier: linear warmup 0->1 over warmup_steps, cosine 1->min_lr_ratio at max_steps, then flat."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return step / cfg.warmup_steps
    if step >= cfg.max_steps:
        return cfg.min_lr_ratio
    decay_steps = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = (step - cfg.warmup_steps) / decay_steps
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine


def warmup_stable_decay(step: int, cfg: OptimConfig) -> float:
    """LR multiplier: linear warmup 0->1, flat at 1, then linear 1->min_lr_ratio over the last
    `cooldown_frac` of max_steps (flat at min_lr_ratio after)."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return step / cfg.warmup_steps
    if step >= cfg.max_steps:
        return cfg.min_lr_ratio
    cooldown = max(1, round(cfg.cooldown_frac * cfg.max_steps))
    left = cfg.max_steps - step
    if left >= cooldown:
        return 1.0
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * left / cooldown


SCHEDULES = {"cosine": warmup_cosine, "wsd": warmup_stable_decay}


def lr_multiplier(step: int, cfg: OptimConfig) -> float:
    """The configured schedule's multiplier at `step`."""
    return SCHEDULES[cfg.schedule](step, cfg)


class _ChainedState(MutableMapping):
    """The optimizers' per-parameter state as one mapping; a write goes to the owner's state."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]) -> None:
        self._optimizers = optimizers

    def _owner(self, key: Any) -> torch.optim.Optimizer:
        for opt in self._optimizers:
            if any(p is key for g in opt.param_groups for p in g["params"]):
                return opt
        raise KeyError(key)

    def __getitem__(self, key: Any) -> Any:
        for opt in self._optimizers:
            if key in opt.state:
                return opt.state[key]
        raise KeyError(key)

    def __setitem__(self, key: Any, value: Any) -> None:
        self._owner(key).state[key] = value

    def __delitem__(self, key: Any) -> None:
        del self._owner(key).state[key]

    def __iter__(self) -> Iterator[Any]:
        for opt in self._optimizers:
            yield from opt.state

    def __len__(self) -> int:
        return sum(len(opt.state) for opt in self._optimizers)


class Chained(torch.optim.Optimizer):
    """Several optimizers over disjoint parameters, driven as one (Lightning, LR schedulers, clipping).

    `param_groups` is the list of the children's group dicts themselves, so a scheduler's change of a
    group's lr reaches the child. `step(closure)` evaluates the closure once, then steps each child.
    """

    def __init__(self, optimizers: list[torch.optim.Optimizer]) -> None:
        self.optimizers = list(optimizers)
        self.defaults: dict[str, Any] = {}
        self.param_groups = [g for opt in self.optimizers for g in opt.param_groups]
        self.state = _ChainedState(self.optimizers)  # type: ignore[assignment]
        self._optimizer_step_pre_hooks: dict = {}
        self._optimizer_step_post_hooks: dict = {}
        self._optimizer_state_dict_pre_hooks: dict = {}
        self._optimizer_state_dict_post_hooks: dict = {}
        self._optimizer_load_state_dict_pre_hooks: dict = {}
        self._optimizer_load_state_dict_post_hooks: dict = {}

    def __repr__(self) -> str:
        return f"Chained({', '.join(type(o).__name__ for o in self.optimizers)})"

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for opt in self.optimizers:
            opt.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"chained": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        parts = state_dict.get("chained")
        if not isinstance(parts, list) or len(parts) != len(self.optimizers):
            raise ValueError(
                f"optimizer state holds {len(parts) if isinstance(parts, list) else 'no'} chained parts, "
                f"expected {len(self.optimizers)} ({self!r}): the checkpoint was written with another optimizer"
            )
        for opt, part in zip(self.optimizers, parts, strict=True):
            opt.load_state_dict(part)
        self.param_groups[:] = [g for opt in self.optimizers for g in opt.param_groups]


def build_optimizer(
    model: nn.Module, cfg: OptimConfig
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """The configured optimizer plus a per-step LambdaLR running the configured schedule.

    adamw: AdamW over `param_groups`. muon: torch.optim.Muon over `muon_matrices` (lr `muon_lr`,
    decoupled weight decay `weight_decay`) and AdamW over everything else, chained.
    """
    groups = param_groups(model, cfg.weight_decay)
    on_cuda = any(p.is_cuda for g in groups for p in g["params"])
    # fused kernels only exist / pay off on CUDA; on CPU the foreach path is used
    extra = {"fused": True} if on_cuda else {}
    adamw_kwargs = {"lr": cfg.lr, "betas": (cfg.beta1, cfg.beta2), "eps": cfg.eps, **extra}
    opt: torch.optim.Optimizer
    if cfg.optimizer == "muon":
        matrices = muon_matrices(model)
        taken = {id(p) for p in matrices}
        rest = [{**g, "params": [p for p in g["params"] if id(p) not in taken]} for g in groups]
        muon = torch.optim.Muon(
            matrices, lr=cfg.muon_lr, weight_decay=cfg.weight_decay, momentum=cfg.muon_momentum
        )
        opt = Chained([muon, torch.optim.AdamW([g for g in rest if g["params"]], **adamw_kwargs)])
    else:
        opt = torch.optim.AdamW(groups, **adamw_kwargs)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_multiplier(step, cfg))
    return opt, sched
