"""The diffusion pieces of DPG-Diff (seed 004, "Beyond Negative Transfer", arXiv 2509.00389;
docs/methods.md "DPG-Diff"), each a small pure function so it can be tested on its own.

Convention: steps are 1..T and ``abar`` has T + 1 entries with ``abar[0] = 1`` (step 0 is the
clean x_0), so ``x_t = sqrt(abar[t]) x_0 + sqrt(1 - abar[t]) eps`` holds for every t in 0..T.

- :func:`beta_schedule`: DDPM's linear schedule (Ho et al. 2020, beta from 1e-4 to 0.02 at T =
  1000, which we rescale by 1000 / T so a short chain still ends near pure noise) or the cosine
  schedule (Nichol & Dhariwal 2021, s = 0.008, betas clipped at 0.999);
- :func:`q_sample`: the forward process q(x_t | x_0);
- :func:`ddim_step`: one deterministic reverse step (DDIM, eta = 0) from x_t to x_{t'} given the
  model's x0 prediction;
- :func:`reverse`: ``steps`` such steps from x_t down to a final x0 prediction.

NOTE: the seed does not give its schedule, T or step rule; our choice (docs/methods.md
"DPG-Diff") is T = 50 by default, linear or cosine, and deterministic DDIM-style inference.
The denoiser predicts x0_hat, not eps (the x0-parameterisation).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch


def beta_schedule(kind: Literal["linear", "cosine"], T: int, beta_start: float = 1e-4,
                  beta_end: float = 0.02) -> torch.Tensor:
    """[T] float64 betas for steps 1..T."""
    if T < 1:
        raise ValueError(f"diffusion T must be >= 1, got {T}")
    if kind == "linear":
        scale = 1000.0 / T  # DDPM's endpoints are for T = 1000
        return torch.linspace(min(beta_start * scale, 0.999), min(beta_end * scale, 0.999), T, dtype=torch.float64)
    if kind == "cosine":
        s = 0.008
        x = torch.arange(T + 1, dtype=torch.float64) / T
        f = torch.cos((x + s) / (1 + s) * math.pi / 2) ** 2
        ab = f / f[0]
        return (1 - ab[1:] / ab[:-1]).clamp(max=0.999)
    raise ValueError(f"unknown beta schedule '{kind}' (linear | cosine)")


def alpha_bars(betas: torch.Tensor) -> torch.Tensor:
    """[T + 1]: abar[0] = 1, abar[t] = prod_{s <= t} (1 - beta_s)."""
    return torch.cat([betas.new_ones(1), torch.cumprod(1 - betas, 0)])


def _at(abar: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """abar[t] shaped to broadcast against ``like`` [N, ...] (t [N] long)."""
    return abar.to(like.device)[t].to(like.dtype).view(-1, *([1] * (like.dim() - 1)))


def q_sample(x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps; x0, eps [N, d], t [N] in 0..T."""
    a = _at(abar, t, x0)
    return a.sqrt() * x0 + (1 - a).sqrt() * eps


def ddim_step(x_t: torch.Tensor, x0_hat: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor,
              abar: torch.Tensor) -> torch.Tensor:
    """Deterministic DDIM step (eta = 0): the noise implied by (x_t, x0_hat) at step t is carried
    to step t_prev < t. ``t_prev = 0`` returns x0_hat exactly."""
    a, a_prev = _at(abar, t, x_t), _at(abar, t_prev, x_t)
    eps_hat = (x_t - a.sqrt() * x0_hat) / (1 - a).sqrt().clamp_min(1e-12)
    return a_prev.sqrt() * x0_hat + (1 - a_prev).sqrt() * eps_hat


def reverse(denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x_t: torch.Tensor, t_start: int,
            abar: torch.Tensor, steps: int | None = None) -> torch.Tensor:
    """Run the reverse chain from x_t at step ``t_start`` to step 0 in ``steps`` deterministic
    steps (default ``t_start``: every step), evenly spaced; -> the final x0 prediction [N, d].

    ``denoise(x, t)`` maps x [N, d] at steps t [N] to x0_hat [N, d]. ``t_start = 0`` returns x_t.
    The loop is over the (few) diffusion steps, never over users."""
    if t_start == 0:
        return x_t
    steps = t_start if steps is None else steps
    if not 1 <= steps <= t_start:
        raise ValueError(f"reverse: steps must be in 1..t_start={t_start}, got {steps}")
    grid = torch.linspace(t_start, 0, steps + 1).round().long().tolist()
    x, N = x_t, x_t.shape[0]
    for t, t_prev in zip(grid[:-1], grid[1:]):
        tt = torch.full((N,), t, dtype=torch.long, device=x.device)
        x0_hat = denoise(x, tt)
        x = ddim_step(x, x0_hat, tt, torch.full_like(tt, t_prev), abar)
    return x
