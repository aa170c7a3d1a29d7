"""FashionBERT's adaptive loss weights (paper section 3.3).

On a step that solves them (every step in the paper; one in `weights_every` here) the task weights ω solve

    min_ω  -1/2 Σ_i ||ω_i ∇l_i||²  +  1/2 Σ_{i<j} (ω_i - ω_j)²    s.t.  Σ ω_i = 1, ω_i >= 0.

With g_i = ||∇l_i||² and Σ ω_i = 1 the gradient of the objective is ω_i (L - g_i) - 1, and on
the simplex its Hessian is diag(L - g_i): the problem is convex, and its minimiser positive, as
long as every g_i < L. The KKT conditions then give the closed form

    ω_i ∝ 1 / (L - g_i).

Raw gradient norms can be any size, so they are normalised first: g_i = (n_i / Σ_j n_j)², with
n_i the gradient norm of task i on the shared parameters. Each g_i then lies in [0, 1] < L, the
closed form always holds, and a task whose gradient dominates gets more weight, as in the paper.

Modes:
- "adaptive":      the rule above, gradient norms taken on the last shared layer (as GradNorm does)
- "released-code": the rule with softmax(losses) in place of the normalised norms (the authors' code)
- "fixed":         ω_i = 1/L
"""

from __future__ import annotations

import torch

MODES = ("adaptive", "released-code", "fixed")


def closed_form_weights(g: torch.Tensor) -> torch.Tensor:
    """ω_i ∝ 1 / (L - g_i) for normalised squared gradient norms g (each < L)."""
    n = g.numel()
    inv = 1.0 / (n - g)
    return inv / inv.sum()


def objective(w: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The paper's objective, for checking the closed form."""
    diff = w[:, None] - w[None, :]
    return -0.5 * (w**2 * g).sum() + 0.25 * (diff**2).sum()  # each pair i<j counted once


class AdaptiveLossWeights:
    def __init__(self, tasks: list[str], mode: str = "adaptive"):
        if mode not in MODES:
            raise ValueError(f"unknown loss weighting {mode!r}: use one of {', '.join(MODES)}")
        self.tasks, self.mode = list(tasks), mode
        self.weights = torch.full((len(tasks),), 1.0 / len(tasks))  # the paper starts from 1/L
        self.active = list(tasks)  # the tasks `weights` are for

    def update(self, losses: dict[str, torch.Tensor], shared: torch.nn.Parameter | None = None) -> dict[str, float]:
        """Re-solve the weights for this step's losses; returns them by task."""
        active = [t for t in self.tasks if t in losses]
        if self.mode == "fixed" or len(active) < 2:
            w = torch.full((len(active),), 1.0 / len(active))
        elif self.mode == "released-code":
            g = torch.softmax(torch.stack([losses[t].detach().float() for t in active]), 0) ** 2
            w = closed_form_weights(g)
        else:
            norms = []
            for t in active:
                (grad,) = torch.autograd.grad(losses[t], shared, retain_graph=True, allow_unused=True)
                norms.append(torch.zeros(()) if grad is None else grad.detach().float().norm())
            n = torch.stack(norms)
            g = (n / n.sum().clamp(min=1e-12)) ** 2
            w = closed_form_weights(g)
        self.weights, self.active = w, active
        return {t: float(x) for t, x in zip(active, w)}

    def current(self, losses: dict[str, torch.Tensor]) -> dict[str, float] | None:
        """The last solved weights for these losses' tasks (None when their tasks differ)."""
        active = [t for t in self.tasks if t in losses]
        if active != self.active or len(active) != len(self.weights):
            return None
        return {t: float(x) for t, x in zip(active, self.weights)}

    def combine(self, losses: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
        return sum(weights[t] * losses[t] for t in weights)
