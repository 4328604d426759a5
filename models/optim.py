"""Ranger: RAdam (Liu et al. 2019) wrapped in Lookahead (Zhang et al. 2019), with gradient centralization.

The optimizer E2Style and pSp train with (their ``training/ranger.py``, Ranger 2020.9). Defaults are theirs:
``betas=(0.95, 0.999)``, ``eps=1e-5``, Lookahead ``alpha=0.5`` every ``k=6`` steps, the rectification
threshold ``N_sma >= 5``, gradient centralization on every tensor of more than one dimension.

All state lives in ``state_dict()`` (tensors and ints only), so a resumed run continues exactly.
"""

from __future__ import annotations

import math

import torch
from torch.optim import Optimizer


class Ranger(Optimizer):
    def __init__(self, params, lr: float = 1e-3, alpha: float = 0.5, k: int = 6, n_sma_threshold: float = 5.0,
                 betas: tuple[float, float] = (0.95, 0.999), eps: float = 1e-5, weight_decay: float = 0.0,
                 use_gc: bool = True, gc_conv_only: bool = False):
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"Ranger: alpha must be in [0, 1], got {alpha}")
        if k < 1:
            raise ValueError(f"Ranger: k must be >= 1, got {k}")
        if lr <= 0 or eps <= 0:
            raise ValueError(f"Ranger: lr and eps must be > 0, got lr={lr}, eps={eps}")
        defaults = dict(lr=lr, alpha=alpha, k=k, n_sma_threshold=n_sma_threshold, betas=tuple(betas), eps=eps,
                        weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.use_gc = use_gc
        # Centralize gradients of conv weights only (dim > 3), or of every matrix and conv weight (dim > 1).
        self.gc_threshold = 3 if gc_conv_only else 1

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad.float()
                if grad.is_sparse:
                    raise RuntimeError("Ranger does not support sparse gradients")
                p_f = p.float() if p.dtype != torch.float32 else p
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p_f)
                    state["exp_avg_sq"] = torch.zeros_like(p_f)
                    state["slow_buffer"] = p_f.detach().clone()
                if self.use_gc and grad.dim() > self.gc_threshold:
                    grad = grad - grad.mean(dim=tuple(range(1, grad.dim())), keepdim=True)
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                state["step"] += 1
                t = state["step"]
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)

                # RAdam: rectify the adaptive step while the variance estimate is unreliable.
                beta2_t = beta2**t
                n_sma_max = 2 / (1 - beta2) - 1
                n_sma = n_sma_max - 2 * t * beta2_t / (1 - beta2_t)
                if n_sma > group["n_sma_threshold"]:
                    step_size = math.sqrt((1 - beta2_t) * (n_sma - 4) / (n_sma_max - 4) * (n_sma - 2) / n_sma
                                          * n_sma_max / (n_sma_max - 2)) / (1 - beta1**t)
                else:
                    step_size = 1.0 / (1 - beta1**t)
                if wd != 0:
                    p_f.add_(p_f, alpha=-wd * lr)
                if n_sma > group["n_sma_threshold"]:
                    p_f.addcdiv_(exp_avg, exp_avg_sq.sqrt().add_(eps), value=-step_size * lr)
                else:
                    p_f.add_(exp_avg, alpha=-step_size * lr)

                # Lookahead: every k steps pull the slow weights towards the fast ones and restart from them.
                if t % group["k"] == 0:
                    slow = state["slow_buffer"]
                    slow.add_(p_f - slow, alpha=group["alpha"])
                    p_f.copy_(slow)
                if p_f is not p:
                    p.copy_(p_f)
        return loss


def build_optimizer(name: str, params, lr: float = 1e-4, weight_decay: float = 0.0) -> Optimizer:
    """``ranger`` (the official choice) or ``adamw``."""
    name = name.lower()
    if name == "ranger":
        return Ranger(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}: use ranger, adamw or adam")
