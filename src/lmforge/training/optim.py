"""AdamW parameter grouping and the warmup+cosine learning-rate schedule.

Weight decay only regularises the big matmul weights of Linear layers; decaying
norm gains or embeddings hurts LMs (embeddings of rare tokens get pulled to 0).
"""

from __future__ import annotations

import math
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


def build_optimizer(
    model: nn.Module, cfg: OptimConfig
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over `param_groups` plus a per-step LambdaLR running `warmup_cosine`."""
    groups = param_groups(model, cfg.weight_decay)
    on_cuda = any(p.is_cuda for g in groups for p in g["params"])
    # fused kernels only exist / pay off on CUDA; on CPU the foreach path is used
    extra = {"fused": True} if on_cuda else {}
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **extra)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: warmup_cosine(step, cfg))
    return opt, sched
