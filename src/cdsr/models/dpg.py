"""DPG-Diff: disentangled preference-guided diffusion with tri-view contrastive learning.

Seed 004 ("Beyond Negative Transfer: Disentangled Preference-Guided Diffusion for Cross-Domain
Sequential Recommendation", arXiv 2509.00389); docs/methods.md "DPG-Diff". There is no public code:
every choice the seed does not fix is marked NOTE.

For a merged window of L events over D domains (shared item embeddings E, tied to the output):

- **Disentangled encoder** (seed Sec. "Disentangled Encoder"): one causal transformer per domain
  a over a's subsequence (the stream layout of :func:`cdsr.models.layers.domain_streams`) gives
  g_a, the stream's state at its last event <= i ([B, L, D, d]; a learned "empty" state before a
  domain's first event). For a target of domain t, the fused, domain-aware guidance is
  ``g_d = MLP([g_t; g_o; g_t * g_o])`` with g_o the mean of the other domains' states (D = 2:
  exactly the seed's [g_x; g_y; g_x * g_y] with x the target domain).
- **Cross-domain encoder** Encoder_c: a SASRec-style causal transformer over the merged window
  (item * sqrt(d) + position + domain embedding) -> x_0 = h_i [d], the user at position i.
- **Forward diffusion** (:mod:`cdsr.models.diffusion`): x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t)
  eps, t ~ U{1..T}, linear or cosine betas.
- **DPG denoiser**: z = x_t + TimeEmb(t); ``denoiser_layers`` pre-LN blocks of
  z += CrossAttn(LN(z), tokens), z += FFN(LN(z)), with tokens = [g_1 .. g_D, g_d] (each plus a
  learned role embedding: target domain / other domain / fused); x0_hat = Linear(LN(z)).
  Ablations (seed Table 3): ``guidance: concat`` (cross-attention replaced by concatenation:
  z = Linear([x_t + TimeEmb(t); g_t; g_o; g_d]), then the FFN blocks) and ``guidance: none``
  (the denoiser sees x_t and t only).
- **Losses**: L_rec = softmax cross-entropy of x0_hat . E over the target domain's items;
  L_diff = ||x0_hat - x_0||^2 (mean over positions and channels); L_cl = tri-view InfoNCE
  (in-batch negatives, temperature tau) between x0_hat, g_d and an augmented view (Encoder_c on
  the sequence augmented by one of crop / mask / reorder / substitute / insert per user,
  :mod:`cdsr.models.augment`), averaged over the three pairs, both directions.
  ``loss = L_rec + lambda_diff L_diff + lambda_cl L_cl``; the three terms are logged apart.
- **Inference**: x_0 of the history is noised to step ``t_inf`` (seeded noise) and ``t_inf``
  deterministic DDIM steps give x0_hat, which scores the items (``t_inf: 0`` scores x_0 itself).

NOTE (our choices where the seed is silent):
- training uses every position of the window (like SASRec), each with its own t and eps; the
  contrastive views are taken at each row's last position (one user, one anchor);
- x_0 is *not* detached in L_diff: Encoder_c learns from the denoiser's reconstruction target as
  well as through x_t (L_rec acts on x0_hat only, per the spec);
- with D > 2 domains the "other" side of g_d is the mean of the other domains' states and every
  domain's state is a guidance token (D = 2 reduces to the seed's pairwise form);
- the domain encoders share the item embeddings with Encoder_c (one table, tied to the output);
- ``lambda_diff`` defaults to 0.1: in a 3-epoch pilot on Food-Kitchen (seed 1) validation NDCG@10
  was 0.0054 at 0.1 and 0.0041 at 1.0 (L_diff then dominates and shrinks x_0's scale);
- ``lambda_rec_x0`` (default 0, so off) adds the softmax loss on x_0 itself. It is not in the
  seed. On the synthetic data after 15 epochs (seed 1, full NDCG@10) it lifts DPG-Diff from
  0.161 to 0.219; SASRec gets 0.244. Turning off L_cl (0.164) or L_diff (0.171) does much less:
  the slow part is that L_rec reaches x_0 only through a noised x_t;
- the inference noise is drawn from a generator seeded with ``inference_seed`` at every score
  call, so evaluation is reproducible; the denoiser does not attend to the merged sequence states
  (the spec's "optionally").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cdsr.models.augment import augment
from cdsr.models.augment import check as check_augmentations
from cdsr.models.base import SeqRecModel, Vocab
from cdsr.models.diffusion import alpha_bars, beta_schedule, q_sample, reverse
from cdsr.models.gca import CrossAttention
from cdsr.models.layers import (
    Dropout,
    Encoder,
    attention_mask,
    domain_softmax_loss,
    domain_streams,
    dot_scores,
    last_stream_states,
    stream_states,
    subsequence_positions,
)


@dataclass(frozen=True)
class DPGConfig:
    d: int = 64
    layers: int = 2  # Encoder_c blocks
    domain_layers: int = 1  # blocks of each domain encoder
    heads: int = 2
    dropout: float = 0.2
    max_len: int = 50
    T: int = 50
    schedule: Literal["linear", "cosine"] = "linear"
    beta_start: float = 1e-4  # DDPM endpoints at T = 1000 (rescaled to T; diffusion.beta_schedule)
    beta_end: float = 0.02
    t_inf: int = 2  # inference: noise x_0 to this step, then t_inf deterministic reverse steps
    denoiser_layers: int = 1
    guidance: Literal["cross_attention", "concat", "none"] = "cross_attention"
    lambda_diff: float = 0.1
    detach_x0: bool = False  # stop the gradient of L_diff into x_0 (the encoder then learns through x_t only)
    lambda_cl: float = 0.1  # 0: no tri-view contrastive learning (ablation)
    lambda_rec_x0: float = 0.0  # the same softmax loss on x_0 itself (not in the seed; off by default)
    tau: float = 0.2
    augmentations: tuple[str, ...] = ("crop", "mask", "reorder", "substitute", "insert")
    aug_rate: float = 0.2
    inference_seed: int = 0
    measure: bool = True  # cos(g_t, g_o) and cos(x_0, x0_hat) on validation after each validation epoch


def timestep_embedding(t: torch.Tensor, d: int) -> torch.Tensor:
    """[N] steps -> [N, d] sinusoidal features (Transformer / DDPM)."""
    half = d // 2
    freq = torch.exp(-math.log(10_000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / max(half, 1))
    ang = t.float()[:, None] * freq[None]
    emb = torch.cat([ang.sin(), ang.cos()], -1)
    return F.pad(emb, (0, d - emb.shape[-1]))


def info_nce(a: torch.Tensor, b: torch.Tensor, tau: float) -> torch.Tensor:
    """Symmetric InfoNCE between rows of a and b [N, d]: row i of a and of b are the positive
    pair, the other rows of the batch the negatives; cosine similarity / tau."""
    a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    logits = a @ b.T / tau
    y = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(logits, y) + F.cross_entropy(logits.T, y))


def tri_view_nce(v1: torch.Tensor, v2: torch.Tensor, v3: torch.Tensor, tau: float) -> torch.Tensor:
    """Mean InfoNCE over the three pairs of views [N, d]."""
    return (info_nce(v1, v2, tau) + info_nce(v1, v3, tau) + info_nce(v2, v3, tau)) / 3


class Denoiser(nn.Module):
    """(x_t [N, d], t [N], tokens [N, K, d], g_t / g_o / g_d [N, d]) -> x0_hat [N, d]."""

    def __init__(self, cfg: DPGConfig):
        super().__init__()
        d = cfg.d
        self.kind = cfg.guidance
        self.temb = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d))
        self.inp = nn.Linear(4 * d, d) if cfg.guidance == "concat" else None
        n = cfg.denoiser_layers
        self.ca = nn.ModuleList(CrossAttention(d, cfg.heads, cfg.dropout) for _ in range(n)) \
            if cfg.guidance == "cross_attention" else None
        self.ln_q = nn.ModuleList(nn.LayerNorm(d) for _ in range(n)) if self.ca is not None else None
        self.ln_f = nn.ModuleList(nn.LayerNorm(d) for _ in range(n))
        self.ffn = nn.ModuleList(nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), Dropout(cfg.dropout), nn.Linear(4 * d, d))
                                 for _ in range(n))
        self.drop = Dropout(cfg.dropout)
        self.out = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, d))

    def forward(self, x_t, t, tokens, g_t, g_o, g_d):
        z = x_t + self.temb(timestep_embedding(t, x_t.shape[-1]))
        if self.inp is not None:
            z = self.inp(torch.cat([z, g_t, g_o, g_d], -1))
        for i, ffn in enumerate(self.ffn):
            if self.ca is not None:
                allowed = torch.ones(z.shape[0], 1, tokens.shape[1], dtype=torch.bool, device=z.device)
                z = z + self.drop(self.ca[i](self.ln_q[i](z)[:, None], tokens, allowed)[:, 0])
            z = z + self.drop(ffn(self.ln_f[i](z)))
        return self.out(z)


class DPGDiff(SeqRecModel):
    def __init__(self, cfg: DPGConfig, vocab: Vocab):
        super().__init__(vocab)
        if not 0 <= cfg.t_inf <= cfg.T:
            raise ValueError(f"t_inf={cfg.t_inf} must be in 0..T={cfg.T}")
        if cfg.tau <= 0:
            raise ValueError(f"tau must be > 0, got {cfg.tau}")
        check_augmentations(cfg.augmentations, cfg.aug_rate)
        self.cfg = cfg
        D, d = vocab.n_domains, cfg.d
        self.add_embeddings(d, cfg.max_len)
        self.encoder_c = Encoder(d, cfg.layers, cfg.heads, cfg.dropout)
        self.stream_pos = nn.ModuleList(nn.Embedding(cfg.max_len, d) for _ in range(D))
        self.streams = nn.ModuleList(Encoder(d, cfg.domain_layers, cfg.heads, cfg.dropout) for _ in range(D))
        self.empty = nn.Parameter(torch.randn(D, d) * 0.02)
        self.fuse = nn.Sequential(nn.Linear(3 * d, d), nn.GELU(), nn.Linear(d, d))
        self.role = nn.Embedding(3, d)  # guidance token roles: target domain, other domain, fused
        self.denoiser = Denoiser(cfg)
        self.drop = Dropout(cfg.dropout)
        ranges = torch.tensor(vocab.domain_ranges, dtype=torch.long)
        self.register_buffer("dom_lo", ranges[:, 0], persistent=False)
        self.register_buffer("dom_size", ranges[:, 1] - ranges[:, 0] + 1, persistent=False)
        self.register_buffer("abar", alpha_bars(beta_schedule(cfg.schedule, cfg.T, cfg.beta_start, cfg.beta_end)).float(),
                             persistent=False)
        nn.init.normal_(self.item_emb.weight, std=d ** -0.5)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    # ---- encoders -------------------------------------------------------------------------
    def _embed(self, items: torch.Tensor) -> torch.Tensor:
        return self.item_emb(items) * math.sqrt(self.cfg.d)

    def _check_len(self, L: int) -> None:
        if L > self.cfg.max_len:
            raise ValueError(f"sequence length {L} > max_len {self.cfg.max_len}")

    def encode_c(self, items: torch.Tensor, domains: torch.Tensor, mask: torch.Tensor,
                 last_only: bool = False) -> torch.Tensor:
        """Encoder_c: [B, L] -> h [B, L, d] (causal: h_i sees events <= i); x_0 at i is h_i.
        ``last_only``: [B, 1, d], the last position (its last block computes it alone)."""
        self._check_len(items.shape[1])
        x = self._embed(items) + self.pos_emb.weight[-items.shape[1]:][None] + self.dom_emb(domains)
        return self.encoder_c(self.drop(x) * mask[..., None], attention_mask(mask, causal=True), last_only=last_only,
                              valid=mask)[0]

    def domain_states(self, items: torch.Tensor, domains: torch.Tensor, mask: torch.Tensor,
                      last_only: bool = False) -> torch.Tensor:
        """The disentangled encoder: [B, L] -> S [B, L, D, d], g_a at the last a-event <= i.
        ``last_only``: S [B, D, d] at the window's end, a right-aligned stream's last entry (or
        ``empty``), its last block computing that position alone."""
        self._check_len(items.shape[1])
        layout = domain_streams(domains, mask, self.vocab.n_domains)
        xs = []
        for a, (order, valid) in enumerate(layout):
            x = self._embed(items.gather(1, order)) + self.stream_pos[a](subsequence_positions(valid))
            xs.append(self.streams[a](self.drop(x) * valid[..., None], attention_mask(valid, causal=True),
                                      last_only=last_only, valid=valid)[0])
        if last_only:
            return last_stream_states(xs, layout, self.empty)
        return stream_states(xs, layout, domains, mask, self.empty)

    def guidance(self, S: torch.Tensor, tdom: torch.Tensor):
        """S [N, D, d], tdom [N] -> (tokens [N, D + 1, d], g_t, g_o, g_d [N, d])."""
        N, D, d = S.shape
        is_t = F.one_hot(tdom, D).bool()  # [N, D]
        g_t = S[torch.arange(N, device=S.device), tdom]
        g_o = (S * (~is_t)[..., None]).sum(1) / max(D - 1, 1) if D > 1 else torch.zeros_like(g_t)
        g_d = self.fuse(torch.cat([g_t, g_o, g_t * g_o], -1))
        roles = torch.where(is_t, 0, 1)
        tokens = torch.cat([S + self.role(roles) + self.dom_emb.weight, (g_d + self.role.weight[2])[:, None]], 1)
        return tokens, g_t, g_o, g_d

    def denoise(self, x_t, t, guide) -> torch.Tensor:
        tokens, g_t, g_o, g_d = guide
        return self.denoiser(x_t, t, tokens, g_t, g_o, g_d)

    # ---- interface ------------------------------------------------------------------------
    def loss(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        items, doms, mask = batch["items"], batch["domains"], batch["mask"]
        h = self.encode_c(items, doms, mask)
        S = self.domain_states(items, doms, mask)
        valid = mask & (batch["targets"] > 0)
        tdom, tgt = batch["target_domains"][valid], batch["targets"][valid]
        x0 = h[valid]
        guide = self.guidance(S[valid], tdom)
        t = torch.randint(1, self.cfg.T + 1, (x0.shape[0],), device=x0.device)
        x0_hat = self.denoise(q_sample(x0, t, torch.randn_like(x0), self.abar), t, guide)
        l_rec = domain_softmax_loss(x0_hat, tgt, tdom, self.item_emb.weight, self.vocab.domain_ranges)
        l_diff = F.mse_loss(x0_hat, x0.detach() if self.cfg.detach_x0 else x0)
        out = {"rec": l_rec.detach(), "diff": l_diff.detach()}
        total = l_rec + self.cfg.lambda_diff * l_diff
        if self.cfg.lambda_rec_x0 > 0:
            l_x0 = domain_softmax_loss(x0, tgt, tdom, self.item_emb.weight, self.vocab.domain_ranges)
            total = total + self.cfg.lambda_rec_x0 * l_x0
            out["rec_x0"] = l_x0.detach()
        if self.cfg.lambda_cl > 0:
            # the last position of each row (right-aligned) whose target is trained: one anchor per user
            last = valid[:, -1]
            if int(last.sum()) >= 2:
                pos = valid.long().cumsum(1)[:, -1] - 1  # index of the last position among this row's valid ones
                flat = (valid.long().sum(1).cumsum(0) - valid.long().sum(1))[last] + pos[last]
                a_i, a_d, a_m = augment(items[last], doms[last], mask[last], self.cfg.augmentations,
                                        self.cfg.aug_rate, self.dom_lo, self.dom_size)
                v_aug = self.encode_c(a_i, a_d, a_m)[:, -1]
                l_cl = tri_view_nce(x0_hat[flat], guide[3][flat], v_aug, self.cfg.tau)
                total = total + self.cfg.lambda_cl * l_cl
                out["cl"] = l_cl.detach()
        out["loss"] = total
        return out

    def represent(self, batch: dict[str, torch.Tensor], t_inf: int | None = None, parts: bool = False):
        """[B, d] the denoised user at the last position, for the requested domain; ``parts``:
        also return (x_0, g_t, g_o) [B, d] (the collapse checks of :meth:`guidance_stats`)."""
        items, doms, mask = batch["items"], batch["domains"], batch["mask"]
        x0 = self.encode_c(items, doms, mask, last_only=True)[:, -1]
        t_inf = self.cfg.t_inf if t_inf is None else t_inf
        if t_inf == 0 and not parts:
            return x0
        guide = self.guidance(self.domain_states(items, doms, mask, last_only=True), batch["target_domain"].to(x0.device))
        out = x0
        if t_inf > 0:
            gen = torch.Generator().manual_seed(self.cfg.inference_seed)
            eps = torch.randn(x0.shape, generator=gen).to(x0.device, x0.dtype)
            t = torch.full((x0.shape[0],), t_inf, dtype=torch.long, device=x0.device)
            out = reverse(lambda x, tt: self.denoise(x, tt, guide), q_sample(x0, t, eps, self.abar), t_inf, self.abar)
        return (out, x0, guide[1], guide[2]) if parts else out

    def score_parts(self, batch: dict[str, torch.Tensor]):
        return self.represent(batch), self.item_emb.weight, None

    def score(self, batch: dict[str, torch.Tensor], candidates: torch.Tensor | None = None) -> torch.Tensor:
        q, table, _ = self.score_parts(batch)
        return dot_scores(q, table, candidates)

    @torch.no_grad()
    def guidance_stats(self, batch_iter) -> dict[str, float]:
        """Collapse checks (seed's failure signature "g_x ~ g_y for all users"): mean cos(g_t, g_o)
        and cos(x_0, x0_hat) at inference over the batches."""
        was = self.training
        self.eval()
        sums = np.zeros(3)
        try:
            for b in batch_iter:
                x0_hat, x0, g_t, g_o = self.represent(b, parts=True)
                sums += [float(F.cosine_similarity(g_t, g_o, dim=-1).sum()),
                         float(F.cosine_similarity(x0, x0_hat, dim=-1).sum()), x0.shape[0]]
        finally:
            self.train(was)
        n = max(sums[2], 1)
        return {"cos_guidance": float(sums[0] / n), "cos_x0_denoised": float(sums[1] / n)}

    def epoch_diagnostics(self, data, eval_cfg, device) -> dict[str, float]:
        if not self.cfg.measure:
            return {}
        from cdsr.data.loaders import EvalDataset

        ds = EvalDataset(data, "valid", self.cfg.max_len)
        bs = eval_cfg.batch_size
        return self.guidance_stats({k: v.to(device) for k, v in ds[np.arange(s, min(s + bs, len(ds)))].items()}
                                   for s in range(0, len(ds), bs))
