"""The dual-stream CDSR host and Gated Cross-Attention (GCA), with the orthogonal-alignment
measurement |cos(X, X')|.

Seeds 002/003 ("Cross-attention Secretly Performs Orthogonal Alignment in Recommendation
Models", arXiv 2510.09435); docs/methods.md "Gated Cross-Attention and orthogonal alignment".
There is no public code: every design choice below that the seed does not fix is marked NOTE.

Host (``dual_stream``), for a merged window of L events over D domains:

- shared item embeddings E [n_items + 1, d], tied to the output (scores are rep . E_j);
- a merged encoder: SASRec-style causal pre-LN transformer over the window (item * sqrt(d) +
  position + domain embedding) -> h^m [B, L, d];
- one causal encoder per domain a over a's subsequence: the a-events of the window are
  compacted and right-aligned into [B, L_a] (L_a = the most a-events of any row in the batch),
  positions counted inside the subsequence from its first event -> X_a [B, L_a, d];
- the representation for a target of domain t after merged position i combines h^m_i with
  X_t at the last t-event <= i (a learned per-domain "empty" state when there is none):
  ``combine: sum`` (h^m + X_t) or ``concat`` (Linear([h^m; X_t])).
- loss: full softmax cross-entropy over the target domain's items (SASRec's ``ce``).

GCA[k] (model ``gca``; ``gca_layers``), after the k-th block of the domain encoders (k = 0:
right after the embeddings), refines every stream in parallel from the others (Sec. 2.3 of the
slides, Figure 3):

    X_a <- X_a + g(alpha_a) * CA_a(LN?(X_a), X_{-a}),   g in {sigmoid, tanh}

CA_a is multi-head cross-attention, queries from stream a, keys/values from the events of the
other domains that happened *before* the query (merged-order index j < i). GCA_early is
``gca_layers: [0]``, GCA_stack ``[0, 1, ...]``.

Measurement (the paper's Observation 2): |cos(X, X')| between a module's input X = X_a and its
cross-attention output X' = CA_a(...), averaged over valid query positions that have at least
one key, per module and query domain, on the validation histories, after every validation
epoch (:meth:`DualStream.epoch_diagnostics`; the training loop puts it into the epoch record,
which goes to MLflow).

Parameter-matched baseline: ``dual_stream`` with ``param_match: [k, ...]`` widens (FFN width or
model width) or deepens itself to the parameter count of host + GCA[k, ...] with this config's
gate / alpha / LN settings, chosen automatically (:func:`matched_config`).

NOTE (our choices where the seed is silent):
- with D > 2 domains CA_a's keys are the union of all other domains' events (D = 2: exactly
  the paper's A <- B and B <- A);
- only the query input is LayerNorm-ed (the spec's CA(LN?(X_A), X_B)); X' gets dropout before
  the gate; alpha starts at ``alpha_init`` = 0, so a sigmoid gate starts half open and a tanh
  gate closed;
- a query with no earlier other-domain event gets X' = 0 (and is left out of the |cos| mean);
- the domain streams are the domain's events inside the merged window of ``max_len`` events (not
  a separate window of ``max_len`` per domain, as ABXI has); the merged encoder has no GCA;
- the paper inserts GCA into ABXI / CDSRNP / LLM4CDSR; this host is a plain ABXI-like
  dual-stream model without ABXI's LoRA adapters and projector.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cdsr.models.base import BackboneConfig, SeqRecModel, Vocab
from cdsr.models.layers import (  # noqa: F401  (domain_streams, stream_slots: re-exported for tests)
    Dropout,
    Encoder,
    attention_mask,
    domain_softmax_loss,
    domain_streams,
    dot_scores,
    last_stream_states,
    stream_slots,
    stream_states,
    subsequence_positions,
)


@dataclass(frozen=True)
class DualStreamConfig(BackboneConfig):
    ffn_dim: int = 0  # FFN hidden width of every encoder block; 0: 4 d
    combine: Literal["sum", "concat"] = "sum"
    gca_layers: tuple[int, ...] = ()  # GCA[k] after domain-encoder block k (0: after the embeddings)
    gate: Literal["sigmoid", "tanh"] = "sigmoid"
    alpha: Literal["scalar", "channel"] = "scalar"  # one learnable alpha per stream, or one per channel
    alpha_init: float = 0.0
    gca_ln: bool = True  # LayerNorm on the query input
    gca_heads: int = 0  # 0: heads
    measure: bool = True  # |cos(X, X')| on validation after each validation epoch
    param_match: tuple[int, ...] = ()  # a host sized to host + GCA[param_match]'s parameter count
    param_match_by: Literal["auto", "ffn", "width", "depth"] = "auto"


@dataclass(frozen=True)
class GCAConfig(DualStreamConfig):
    gca_layers: tuple[int, ...] = (0,)


class CrossAttention(nn.Module):
    """Multi-head cross-attention: xq [B, Lq, d], xkv [B, Lk, d], allowed [B, Lq, Lk] -> [B, Lq, d];
    a query row with no allowed key outputs 0."""

    def __init__(self, d: int, heads: int, dropout: float):
        super().__init__()
        if d % heads:
            raise ValueError(f"d={d} is not divisible by gca_heads={heads}")
        self.h, self.dk, self.p = heads, d // heads, dropout
        self.q = nn.Linear(d, d)
        self.kv = nn.Linear(d, 2 * d)
        self.o = nn.Linear(d, d)

    def forward(self, xq: torch.Tensor, xkv: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        B, Lq, d = xq.shape
        Lk = xkv.shape[1]
        if Lk == 0:
            return xq.new_zeros(B, Lq, d)
        live = allowed.any(-1)
        q = self.q(xq).view(B, Lq, self.h, self.dk).transpose(1, 2)
        k, v = self.kv(xkv).view(B, Lk, 2, self.h, self.dk).permute(2, 0, 3, 1, 4)
        m = (allowed | ~live.unsqueeze(-1)).unsqueeze(1)  # empty rows attend anywhere, then are zeroed
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=m, dropout_p=self.p if self.training else 0.0)
        return self.o(y.transpose(1, 2).reshape(B, Lq, d)) * live.unsqueeze(-1)


class GCA(nn.Module):
    """One GCA[k]: D parallel gated cross-attentions, stream a <- the other streams."""

    def __init__(self, cfg: DualStreamConfig, n_domains: int):
        super().__init__()
        self.D, self.kind = n_domains, cfg.gate
        self.ca = nn.ModuleList(CrossAttention(cfg.d, cfg.gca_heads or cfg.heads, cfg.dropout) for _ in range(n_domains))
        self.ln = nn.ModuleList(nn.LayerNorm(cfg.d) for _ in range(n_domains)) if cfg.gca_ln else None
        self.alpha = nn.Parameter(torch.full((n_domains, cfg.d if cfg.alpha == "channel" else 1), cfg.alpha_init))
        self.drop = Dropout(cfg.dropout)

    def gate(self) -> torch.Tensor:
        """[D, 1 | d] g(alpha)."""
        return torch.sigmoid(self.alpha) if self.kind == "sigmoid" else torch.tanh(self.alpha)

    def forward(self, xs: list[torch.Tensor], midx: list[torch.Tensor], valid: list[torch.Tensor],
                stats: torch.Tensor | None = None) -> list[torch.Tensor]:
        """xs / midx / valid: per stream [B, L_a, d] / [B, L_a] merged index / [B, L_a]. ``stats``
        [D, 2] accumulates (sum of |cos(X, X')|, count) per query domain."""
        g = self.gate()
        out = []
        for a in range(self.D):
            others = [b for b in range(self.D) if b != a]
            if not others:
                out.append(xs[a])
                continue
            kx = torch.cat([xs[b] for b in others], 1)
            km = torch.cat([midx[b] for b in others], 1)
            kv = torch.cat([valid[b] for b in others], 1)
            allowed = kv[:, None, :] & (km[:, None, :] < midx[a][:, :, None]) & valid[a][:, :, None]
            q_in = self.ln[a](xs[a]) if self.ln is not None else xs[a]
            xp = self.ca[a](q_in, kx, allowed)
            if stats is not None:
                live = allowed.any(-1)
                c = F.cosine_similarity(xs[a].float(), xp.float(), dim=-1, eps=1e-12).abs()
                stats[a, 0] += c[live].sum()
                stats[a, 1] += live.sum()
            out.append(xs[a] + g[a] * self.drop(xp))
        return out


class DualStream(SeqRecModel):
    def __init__(self, cfg: DualStreamConfig, vocab: Vocab):
        super().__init__(vocab)
        if cfg.param_match:
            cfg = matched_config(cfg, vocab)
        self.cfg = cfg
        D, d = vocab.n_domains, cfg.d
        bad = [k for k in cfg.gca_layers if not 0 <= k <= cfg.layers]
        if bad or len(set(cfg.gca_layers)) != len(cfg.gca_layers):
            raise ValueError(f"gca_layers {list(cfg.gca_layers)}: each must be distinct and in 0..layers={cfg.layers}")
        ffn = cfg.ffn_dim or None
        self.add_embeddings(d, cfg.max_len)
        self.merged = Encoder(d, cfg.layers, cfg.heads, cfg.dropout, ffn)
        self.stream_pos = nn.ModuleList(nn.Embedding(cfg.max_len, d) for _ in range(D))
        self.streams = nn.ModuleList(Encoder(d, cfg.layers, cfg.heads, cfg.dropout, ffn) for _ in range(D))
        self.gca = nn.ModuleDict({str(k): GCA(cfg, D) for k in sorted(cfg.gca_layers)})
        self.empty = nn.Parameter(torch.randn(D, d) * 0.02)  # X_t before the window's first t-event
        self.combine = nn.Linear(2 * d, d) if cfg.combine == "concat" else None
        self.drop = Dropout(cfg.dropout)
        nn.init.normal_(self.item_emb.weight, std=d ** -0.5)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    def _embed(self, items: torch.Tensor) -> torch.Tensor:
        return self.item_emb(items) * math.sqrt(self.cfg.d)

    def encode(self, batch: dict[str, torch.Tensor], stats: dict[int, torch.Tensor] | None = None,
               last_only: bool = False):
        """-> (h^m [B, L, d], S [B, L, D, d]: each domain's stream state at the last event <= i).

        ``stats``: GCA placement -> [D, 2] |cos| accumulators (see :class:`GCA`). ``last_only``
        (scoring): h^m [B, d] and S [B, D, d] at the window's end only; each encoder's last block
        then computes its last position alone, unless a GCA after the last layer reads every
        position of the other streams."""
        items, doms, mask = batch["items"], batch["domains"], batch["mask"]
        B, L = items.shape
        if L > self.cfg.max_len:
            raise ValueError(f"sequence length {L} > max_len {self.cfg.max_len}")
        x = self._embed(items) + self.pos_emb.weight[-L:][None] + self.dom_emb(doms)
        h_m, _ = self.merged(self.drop(x) * mask[..., None], attention_mask(mask, causal=True), last_only=last_only,
                             valid=mask)

        D = self.vocab.n_domains
        layout = domain_streams(doms, mask, D)
        midx = [o for o, _ in layout]
        valid = [v for _, v in layout]
        masks = [attention_mask(v, causal=True) for v in valid]
        # positions count from the stream's first event: counted from the end, they would tell an
        # early event how many events of its domain follow it (a leak of the future)
        xs = [self.drop(self._embed(items.gather(1, o)) + self.stream_pos[a](subsequence_positions(v))) * v[..., None]
              for a, (o, v) in enumerate(layout)]

        def cross(k: int, xs: list[torch.Tensor]) -> list[torch.Tensor]:
            if str(k) not in self.gca:
                return xs
            return self.gca[str(k)](xs, midx, valid, None if stats is None else stats.setdefault(k, x.new_zeros(D, 2)))

        xs = cross(0, xs)
        n = self.cfg.layers
        last_block = last_only and str(n) not in self.gca
        for layer in range(n):
            xs = [self.streams[a].blocks[layer](xs[a], masks[a], last_only=last_block and layer == n - 1, valid=valid[a])[0]
                  for a in range(D)]
            xs = cross(layer + 1, xs)
        xs = [self.streams[a].ln(xs[a]) for a in range(D)]
        if last_only:  # a right-aligned stream's state at the window's end: its last entry, if any
            return h_m[:, -1], last_stream_states(xs, layout, self.empty)
        S = stream_states(xs, layout, doms, mask, self.empty)
        return h_m, S

    def represent(self, h_m: torch.Tensor, S: torch.Tensor, tdom: torch.Tensor) -> torch.Tensor:
        """h_m [..., d], S [..., D, d], tdom [...] -> the user representation [..., d]."""
        s = S.gather(-2, tdom[..., None, None].expand(*tdom.shape, 1, S.shape[-1])).squeeze(-2)
        return h_m + s if self.combine is None else self.combine(torch.cat([h_m, s], -1))

    def loss(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        h_m, S = self.encode(batch)
        valid = batch["mask"] & (batch["targets"] > 0)
        tdom = batch["target_domains"]
        q = self.represent(h_m[valid], S[valid], tdom[valid])
        return {"loss": domain_softmax_loss(q, batch["targets"][valid], tdom[valid], self.item_emb.weight,
                                            self.vocab.domain_ranges)}

    def score_parts(self, batch: dict[str, torch.Tensor]):
        h_m, S = self.encode(batch, last_only=True)
        return self.represent(h_m, S, batch["target_domain"].to(h_m.device)), self.item_emb.weight, None

    def score(self, batch: dict[str, torch.Tensor], candidates: torch.Tensor | None = None) -> torch.Tensor:
        q, table, _ = self.score_parts(batch)
        return dot_scores(q, table, candidates)

    def orthogonality(self, batch_iter) -> dict[str, float]:
        """See :func:`orthogonality` (the module-level function)."""
        return orthogonality(self, batch_iter)

    def epoch_diagnostics(self, data, eval_cfg, device) -> dict[str, float]:
        """The training loop's per-validation-epoch hook: :func:`orthogonality` on ``valid``."""
        if not (self.gca and self.cfg.measure):
            return {}
        return validation_orthogonality(self, data, eval_cfg, device)


@torch.no_grad()
def orthogonality(model: SeqRecModel, batch_iter) -> dict[str, float]:
    """Mean |cos(X, X')| and g(alpha) per GCA module and query domain over the batches of
    ``batch_iter``, for any host whose ``encode(batch, stats)`` fills GCA accumulators and whose
    ``gca`` holds the modules (the dual-stream host, ABXI): keys ``cos_gca{k}_{domain}``,
    ``cos_gca{k}`` (all domains), ``cos`` (all modules), ``gate_gca{k}_{domain}`` (mean over
    channels)."""
    if not model.gca:
        return {}
    was = model.training
    model.eval()
    stats: dict[int, torch.Tensor] = {}
    try:
        for batch in batch_iter:
            model.encode(batch, stats)
    finally:
        model.train(was)
    names = model.vocab.domain_names or tuple(str(a) for a in range(model.vocab.n_domains))
    out: dict[str, float] = {}
    total = torch.zeros(2)
    for k, st in sorted(stats.items()):
        st = st.cpu()
        total += st.sum(0)
        gate = model.gca[str(k)].gate().mean(-1).cpu()
        for a, name in enumerate(names):
            out[f"cos_gca{k}_{name}"] = float(st[a, 0] / st[a, 1]) if st[a, 1] else float("nan")
            out[f"gate_gca{k}_{name}"] = float(gate[a])
        s = st.sum(0)
        out[f"cos_gca{k}"] = float(s[0] / s[1]) if s[1] else float("nan")
    out["cos"] = float(total[0] / total[1]) if total[1] else float("nan")
    return out


def validation_orthogonality(model: SeqRecModel, data, eval_cfg, device) -> dict[str, float]:
    """:func:`orthogonality` over the validation histories of ``data``."""
    from cdsr.data.loaders import EvalDataset

    ds = EvalDataset(data, "valid", model.cfg.max_len)
    bs = eval_cfg.batch_size
    batches = ({k: v.to(device) for k, v in ds[np.arange(s, min(s + bs, len(ds)))].items()}
               for s in range(0, len(ds), bs))
    return orthogonality(model, batches)


def n_parameters(cfg: DualStreamConfig, vocab: Vocab) -> int:
    """Parameter count of the model ``cfg`` builds (on the meta device: no memory, no init)."""
    with torch.device("meta"):
        return sum(p.numel() for p in DualStream(cfg, vocab).parameters())


def matched_config(cfg: DualStreamConfig, vocab: Vocab) -> DualStreamConfig:
    """The host (no GCA) with the parameter count of host + GCA[cfg.param_match]: the smallest
    candidate at or above that count, among wider FFNs (``ffn``), wider models (``width``, d in
    steps of ``heads``) and deeper encoders (``depth``); ``auto`` takes the closest of all three."""
    host = dataclasses.replace(cfg, gca_layers=(), param_match=())
    target = n_parameters(dataclasses.replace(host, gca_layers=tuple(cfg.param_match)), vocab)
    base_ffn = cfg.ffn_dim or 4 * cfg.d
    per_unit = n_parameters(dataclasses.replace(host, ffn_dim=base_ffn + 1), vocab) - n_parameters(
        dataclasses.replace(host, ffn_dim=base_ffn), vocab)
    need = target - n_parameters(dataclasses.replace(host, ffn_dim=base_ffn), vocab)
    cands: list[DualStreamConfig] = []
    if cfg.param_match_by in ("auto", "ffn"):
        cands.append(dataclasses.replace(host, ffn_dim=base_ffn + max(1, -(-need // per_unit))))
    if cfg.param_match_by in ("auto", "width"):
        d = cfg.d + cfg.heads
        while n_parameters(dataclasses.replace(host, d=d), vocab) < target:
            d += cfg.heads
        cands.append(dataclasses.replace(host, d=d))
    if cfg.param_match_by in ("auto", "depth"):
        layers = cfg.layers + 1
        while n_parameters(dataclasses.replace(host, layers=layers), vocab) < target:
            layers += 1
        cands.append(dataclasses.replace(host, layers=layers))
    return min(cands, key=lambda c: n_parameters(c, vocab) - target)
