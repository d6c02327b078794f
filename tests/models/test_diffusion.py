"""DPG-Diff's diffusion pieces against closed forms: the beta schedules, the forward process, the
deterministic DDIM step and the reverse chain."""

from __future__ import annotations

import math

import pytest
import torch

from cdsr.models.diffusion import alpha_bars, beta_schedule, ddim_step, q_sample, reverse


def test_linear_schedule_is_ddpm_rescaled_to_T():
    b = beta_schedule("linear", 50)
    assert b.shape == (50,) and b.dtype == torch.float64
    assert b[0] == pytest.approx(1e-4 * 20) and b[-1] == pytest.approx(0.02 * 20)
    assert torch.all(b[1:] > b[:-1])
    assert torch.allclose(b, torch.linspace(0.002, 0.4, 50, dtype=torch.float64))
    # T = 1000 is DDPM's own schedule
    assert torch.allclose(beta_schedule("linear", 1000), torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64))


def test_cosine_schedule_matches_the_closed_form_abar():
    T, s = 50, 0.008
    ab = alpha_bars(beta_schedule("cosine", T))
    f = [math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2 for t in range(T + 1)]
    want = torch.tensor([x / f[0] for x in f], dtype=torch.float64)
    # the last beta is clipped at 0.999, so abar_T differs from the closed form (which is 0)
    assert torch.allclose(ab[:-1], want[:-1], atol=1e-12)
    assert ab[-1] < 1e-3


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_alpha_bars_start_clean_decrease_and_end_near_noise(kind):
    ab = alpha_bars(beta_schedule(kind, 50))
    assert ab.shape == (51,) and ab[0] == 1.0
    assert torch.all(ab[1:] < ab[:-1])
    assert ab[-1] < 1e-3  # x_T is (almost) pure noise


def test_bad_schedule_is_refused():
    with pytest.raises(ValueError, match="unknown beta schedule"):
        beta_schedule("quadratic", 10)
    with pytest.raises(ValueError, match="T must be"):
        beta_schedule("linear", 0)


def test_q_sample_formula_and_moments():
    ab = alpha_bars(beta_schedule("linear", 50)).float()
    x0 = torch.randn(4, 8)
    eps = torch.randn(4, 8)
    t = torch.tensor([0, 1, 25, 50])
    xt = q_sample(x0, t, eps, ab)
    for r in range(4):
        a = float(ab[t[r]])
        assert torch.allclose(xt[r], math.sqrt(a) * x0[r] + math.sqrt(1 - a) * eps[r], atol=1e-6)
    assert torch.equal(xt[0], x0[0])  # step 0 is x_0 itself
    # moments over many draws at one step
    g = torch.Generator().manual_seed(0)
    x = torch.full((200_000, 1), 2.0)
    e = torch.randn(x.shape, generator=g)
    s = q_sample(x, torch.full((x.shape[0],), 10), e, ab)
    a = float(ab[10])
    assert float(s.mean()) == pytest.approx(2 * math.sqrt(a), abs=0.01)
    assert float(s.var()) == pytest.approx(1 - a, abs=0.01)


def test_ddim_step_with_the_true_x0_moves_along_the_same_noise():
    """DDIM's defining property: given the exact x0, the step from x_t lands on q(x_t' | x_0) with
    the *same* eps (deterministic, eta = 0); t' = 0 gives x0."""
    ab = alpha_bars(beta_schedule("cosine", 50)).float()
    x0, eps = torch.randn(5, 6), torch.randn(5, 6)
    t = torch.full((5,), 30)
    xt = q_sample(x0, t, eps, ab)
    for tp in (29, 10, 1):
        want = q_sample(x0, torch.full((5,), tp), eps, ab)
        assert torch.allclose(ddim_step(xt, x0, t, torch.full((5,), tp), ab), want, atol=1e-5)
    assert torch.allclose(ddim_step(xt, x0, t, torch.zeros(5, dtype=torch.long), ab), x0, atol=1e-6)


@pytest.mark.parametrize("t_start,steps", [(1, None), (5, None), (20, None), (20, 4)])
def test_reverse_with_a_perfect_denoiser_recovers_x0_in_the_given_steps(t_start, steps):
    ab = alpha_bars(beta_schedule("linear", 50)).float()
    x0, eps = torch.randn(3, 4), torch.randn(3, 4)
    calls = []

    def oracle(x, t):
        calls.append(int(t[0]))
        return x0

    out = reverse(oracle, q_sample(x0, torch.full((3,), t_start), eps, ab), t_start, ab, steps)
    assert torch.allclose(out, x0, atol=1e-5)
    n = t_start if steps is None else steps
    assert len(calls) == n and calls[0] == t_start and calls == sorted(calls, reverse=True)


def test_reverse_from_step_zero_is_the_identity_and_steps_are_checked():
    ab = alpha_bars(beta_schedule("linear", 10)).float()
    x = torch.randn(2, 3)
    assert reverse(lambda x, t: pytest.fail("denoiser called"), x, 0, ab) is x
    with pytest.raises(ValueError, match="steps"):
        reverse(lambda x, t: x, x, 3, ab, steps=4)
