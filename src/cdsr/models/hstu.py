"""HSTU (Zhai et al. 2024, "Actions Speak Louder than Words: Trillion-Parameter Sequential
Transducers for Generative Recommendations", Sec. 3; reference code: meta-recsys/
generative-recommenders, ``research/modeling/sequential/hstu.py``).

Input: x = e_item * sqrt(d) + e_pos (+ e_dom of each event, merged variant), dropout.
Per layer (Sec. 3, Eq. 1-3), with n = LayerNorm(x) (no affine):
    U, V, Q, K = split(SiLU(n W1))                                   (Eq. 1)
    A = SiLU(Q K^T + rab^{p,t}) / N, causal and valid keys only        (Eq. 2, Sec. 3.1)
    x = x + W_o(dropout(U * LayerNorm(A V)))                           (Eq. 3; no FFN)
Output h_i = LayerNorm(x)_i. Loss (docs/methods.md "HSTU"): sampled softmax over L2-normalised query and
item vectors, temperature 0.05, R uniform negatives drawn from the target's domain.

NOTE (our choices where the paper is open; summarised in docs/methods.md "HSTU"):
- positions count valid events from the oldest one in the window (0 = oldest), so more left
  padding changes nothing, and training position i sees the same positions as an inference
  history of i+1 events (the reference is left-aligned, which gives the same numbering);
- rab is shared by all heads (one scalar per bucket), as in the reference implementation;
- the query side adds a learned *requested-domain* embedding (target_domains[:, i] in training,
  target_domain at inference) to h_i before scoring: the loss ranks within that domain, so the
  query must know which domain is asked for (allowed: the domain of i+1 is known at serving);
- the query time of position i is t_{i+1} (HSTU's convention). Training batches carry no
  timestamp for the last position's target: it falls back to its own timestamp (as the
  reference does), unless the batch has ``target_timestamps [B, L]`` or ``target_timestamp [B]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cdsr.models.base import BackboneConfig, SeqRecModel, Vocab
from cdsr.models.intra_attention import (
    BiasFn,
    DensePlan,
    TiledPlan,
    dense_plan,
    intra_domain_mask,
)
from cdsr.models.layers import (
    Dropout,
    dot_scores,
    sample_domain_negatives,
    sampled_softmax_loss,
)

N_TIME_BUCKETS = 128  # buckets 0..128 (129 weights), bucket = clamp(floor(ln(max(dt,1)) / 0.301))


@dataclass(frozen=True)
class HSTUConfig(BackboneConfig):
    d_qk: int = 32
    d_v: int = 32
    n_negatives: int = 128
    temperature: float = 0.05
    use_domain_emb: bool = True  # merged variant; the single-domain variant turns it off
    time_bias: bool = True
    rel_pos_bias: bool = True


def time_buckets(query_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """[B, L, L] bucket of |query_t_i - t_j| = clamp(floor(ln(max(dt, 1)) / 0.301), 0, 128)."""
    return bucketise(query_t.unsqueeze(2) - t.unsqueeze(1))


def bucketise(dt: torch.Tensor) -> torch.Tensor:
    """Time bucket of time differences (any shape): clamp(floor(ln(max(|dt|, 1)) / 0.301), 0, 128)."""
    dt = dt.abs().clamp(min=1).to(torch.float32)
    return (torch.log(dt) / 0.301).floor().clamp(0, N_TIME_BUCKETS).long()


def _lookup(w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``w[idx]`` for a bias vector ``w`` [n] and an index tensor of any shape. NOTE: through
    ``F.embedding``, whose backward adds the gradients up in a fixed order; plain indexing
    accumulates them with ``index_put_``, whose order on a multi-threaded CPU varies from run to
    run, so the same seed gave different models (the benchmark's dvc.lock changed on a repeat)."""
    return F.embedding(idx, w[:, None]).squeeze(-1)


class RelativeBias(nn.Module):
    """rab^{p,t} (Sec. 3, Eq. 2): learned bias over i - j (2N-1 buckets) + over log-bucketed
    |t_{i+1} - t_j|; one scalar per bucket shared by all heads, evaluated at index pairs (:meth:`pair_fn`)."""

    def __init__(self, max_len: int, rel_pos: bool, time: bool):
        super().__init__()
        self.N = max_len
        b = math.sqrt(1.0 / max_len)  # the reference's uniform init
        self.pos_w = nn.Parameter(torch.empty(2 * max_len - 1).uniform_(-b, b)) if rel_pos else None
        self.ts_w = nn.Parameter(torch.empty(N_TIME_BUCKETS + 1).uniform_(-b, b)) if time else None

    def pair_fn(self, t: torch.Tensor, query_t: torch.Tensor) -> BiasFn | None:
        """``bias(b, i, j)``: rab for batch rows b, query positions i, key positions j (index
        tensors that broadcast, e.g. [B,1,1], [1,L,1], [1,1,L] for the dense [B, L, L]); None
        when both biases are off. Positions are window indices (i - j is the same as in valid-count
        positions: the window is right-aligned)."""
        if self.pos_w is None and self.ts_w is None:
            return None

        def bias(b: torch.Tensor, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
            out = 0.0
            if self.pos_w is not None:
                out = _lookup(self.pos_w, i - j + self.N - 1)
            if self.ts_w is not None:
                out = out + _lookup(self.ts_w, bucketise(query_t[b, i] - t[b, j]))
            return out

        return bias


class HSTULayer(nn.Module):
    """One HSTU layer (Sec. 3, Eq. 1-3): x [B, L, d] -> x [B, L, d]."""

    def __init__(self, cfg: HSTUConfig):
        super().__init__()
        self.h, self.dqk, self.dv = cfg.heads, cfg.d_qk, cfg.d_v
        self.uvqk = nn.Linear(cfg.d, 2 * cfg.heads * (cfg.d_v + cfg.d_qk))
        self.o = nn.Linear(cfg.heads * cfg.d_v, cfg.d)
        self.drop = Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, plan: DensePlan | TiledPlan) -> torch.Tensor:
        """``plan``: the attention of this forward (dense, or block-sparse intra-domain)."""
        B, L, d = x.shape
        hv, hq = self.h * self.dv, self.h * self.dqk
        u, v, q, k = F.silu(self.uvqk(F.layer_norm(x, (d,)))).split([hv, hv, hq, hq], dim=-1)
        heads = lambda z, e: z.reshape(B, L, self.h, e).transpose(1, 2)
        av = plan.attend(heads(q, self.dqk), heads(k, self.dqk), heads(v, self.dv))
        y = u * F.layer_norm(av, (hv,))  # LayerNorm over the concatenated heads, no affine
        return x + self.o(self.drop(y))


class HSTU(SeqRecModel):
    def __init__(self, cfg: HSTUConfig, vocab: Vocab):
        super().__init__(vocab)
        self.cfg = cfg
        self.add_embeddings(cfg.d, cfg.max_len, cfg.use_domain_emb)
        self.req_emb = nn.Embedding(vocab.n_domains, cfg.d)  # NOTE: requested-domain query embedding
        self.drop = Dropout(cfg.dropout)
        self.rab = RelativeBias(cfg.max_len, cfg.rel_pos_bias, cfg.time_bias)
        self.layers = nn.ModuleList(HSTULayer(cfg) for _ in range(cfg.layers))
        self.out_ln = nn.LayerNorm(cfg.d)
        r = torch.tensor(vocab.domain_ranges, dtype=torch.long)
        self.register_buffer("dom_lo", r[:, 0].clone(), persistent=False)
        self.register_buffer("dom_size", r[:, 1] - r[:, 0] + 1, persistent=False)
        for emb in (self.item_emb, self.pos_emb, self.req_emb) + ((self.dom_emb,) if self.dom_emb is not None else ()):
            nn.init.normal_(emb.weight, std=0.02)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    @staticmethod
    def query_times(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """[B, L] the query time t_{i+1} of each position (see the module NOTE)."""
        ts = batch["timestamps"]
        if "target_timestamps" in batch:
            return batch["target_timestamps"].to(ts)
        last = batch.get("target_timestamp", ts[:, -1]).reshape(-1, 1).to(ts)
        return torch.cat([ts[:, 1:], last], dim=1)

    def encode(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """h [B, L, d]: the output of every position (position i sees events <= i only, plus the
        timestamp t_{i+1} through the time bias)."""
        items, valid = batch["items"], batch["mask"].bool()
        if items.shape[1] > self.cfg.max_len:
            raise ValueError(f"sequence length {items.shape[1]} > max_len {self.cfg.max_len}")
        x = self.drop(self.embed(batch, valid)) * valid.unsqueeze(-1)
        plan = self.attention_plan(batch, valid)
        for i, layer in enumerate(self.layers):
            x = self.after_layer(i, layer(x, plan), batch, valid)
        return self.out_ln(x)

    def embed(self, batch: dict[str, torch.Tensor], valid: torch.Tensor) -> torch.Tensor:
        """[B, L, d] input before dropout: e_item * sqrt(d) + e_pos (+ e_dom)."""
        pos = (valid.long().cumsum(1) - 1).clamp(min=0)  # NOTE: 0 = oldest valid event
        x = self.item_emb(batch["items"]) * math.sqrt(self.cfg.d) + self.pos_emb(pos)
        if self.dom_emb is not None:
            x = x + self.dom_emb(batch["domains"])
        return x

    def after_layer(self, index: int, x: torch.Tensor, batch: dict[str, torch.Tensor],
                    valid: torch.Tensor) -> torch.Tensor:
        """Hook after layer ``index`` (HSTU-CD's DDSR); plain HSTU: identity."""
        return x

    def attention_plan(self, batch: dict[str, torch.Tensor], valid: torch.Tensor) -> DensePlan | TiledPlan:
        """Causal attention over valid events (j <= i), dense; HSTU-CD overrides this."""
        mask = intra_domain_mask(batch["domains"], valid, same_domain=False)
        bias = self.rab.pair_fn(batch["timestamps"], self.query_times(batch))
        return dense_plan(mask, bias, float(self.cfg.max_len))

    def query(self, h: torch.Tensor, req_domains: torch.Tensor) -> torch.Tensor:
        """[..., d] L2-normalised query: h + e_req(requested domain) (NOTE: our addition)."""
        return F.normalize(h + self.req_emb(req_domains), dim=-1)

    def item_vectors(self, ids: torch.Tensor | None = None) -> torch.Tensor:
        """L2-normalised item embeddings: of ``ids`` ([..., d]), or the whole table [n_items + 1, d].

        Training gathers the rows first, then normalises them: the same values, without touching
        the whole table each step (KuaiRand-1K has 944k items). F.embedding rather than indexing:
        its backward measured a little faster on CPU."""
        if ids is None:
            return F.normalize(self.item_emb.weight, dim=-1)
        return F.normalize(F.embedding(ids, self.item_emb.weight), dim=-1)

    def loss(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Sampled softmax: each valid position ranks its target against R uniform negatives of
        the target's domain (negatives equal to the target are masked); mean over positions."""
        h = self.encode(batch)
        targets = batch["targets"]
        keep = batch["mask"].bool() & (targets > 0)
        if not keep.any():
            return {"loss": h.sum() * 0.0}
        pos, dom = targets[keep], batch["target_domains"][keep]  # [P]
        q = self.query(h[keep], dom)  # [P, d]
        neg = sample_domain_negatives(dom, self.dom_lo, self.dom_size, self.cfg.n_negatives)  # [P, R]
        # cosine / temperature against [positive, R negatives]; only the gathered rows are normalised
        return {"loss": sampled_softmax_loss(q, self.item_emb.weight, pos, neg, 1.0 / self.cfg.temperature,
                                             normalize=True)}

    def score(self, batch: dict[str, torch.Tensor], candidates: torch.Tensor | None = None) -> torch.Tensor:
        """Cosine(query of the last position, item) / temperature: [B, n_items + 1] (column 0 =
        padding = -inf) or [B, C] for ``candidates`` (id 0 = padding = -inf)."""
        q, table, _ = self.score_parts(batch)
        return dot_scores(q, table, candidates)

    def score_parts(self, batch: dict[str, torch.Tensor]):
        """q / temperature and the normalised item table: their products are the cosine scores."""
        q = self.query(self.encode(batch)[:, -1], batch["target_domain"])  # [B, d]
        return q / self.cfg.temperature, self.item_vectors(), None
