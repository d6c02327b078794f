"""ABXI (Bian et al., "ABXI: Invariant Interest Adaptation for Task-Guided Cross-Domain
Sequential Recommendation", WWW 2025), generalised from 2 to D domains.

One shared encoder (a post-norm causal self-attention layer, then a shared SwiGLU FFN) reads
the merged sequence and each domain's own subsequence; each of these 1 + D streams adds its
own low-rank adapter to the FFN's residual (dLoRA, Sec. 3.2). For a target of domain t at
merged position i the user representation is (Sec. 3.3)

    r = LN_it(h^x_i + P_i(h^x_i) + iLoRA_t(h^x_i)) + LN_tt(h^t_j + P_t(h^t_j))

with h^x the merged stream, h^t the domain-t stream at its last event j <= i (task-guided
alignment: the domain the next item is requested in picks the stream), P_i the shared
invariant projector and P_t domain t's projector (SwiGLU FFNs). Loss: InfoNCE of r . e_target
/ temperature against ``n_negatives`` uniform items of *every* domain (ABXI draws its negatives
from both domains whatever the target's domain), or the full softmax over the target's domain.

NOTE (departures from the paper and its public code):
- D domains: one dLoRA per stream, one iLoRA, projector and two LayerNorms per domain; with
  D = 2 this is ABXI's layout.
- Negatives are drawn uniformly from each domain's items; ABXI also excludes the user's
  history items from its negatives. Negatives equal to the target are masked.
  ``negatives: sequence`` draws them once per training sequence, shared by its positions (a
  GEMM per sequence instead of a gather per position); ABXI's code draws per position.
- Where domain t has no event before i, h^t is zero (ABXI's zero-padded aligned slot).
- Positions: ABXI's code counts each stream's positions back from its last event (the last
  event gets index 1). ``positions: last`` counts every stream's events back from the end of
  the merged window (SASRec's fixed slots): for the merged stream that is ABXI's index; for a
  domain stream it is the event's distance in merged steps, not in same-domain events, because
  during training ABXI's count tells an earlier position how many same-domain events follow it
  (a leak of future domains that our causality test refuses). ``first`` counts from each
  stream's first event (this model's default until issue 19's third session, when ``last``
  raised the Food-Kitchen validation sum of MRR from 0.2797 to 0.2910, docs/results.md).
- Attention dropout: ABXI's code applies dropout to the attention output only (its
  ``nn.MultiheadAttention`` has none on the probabilities); ours also drops the probabilities
  at ``dropout`` unless ``attn_dropout`` says otherwise (0.0 is ABXI's).
- Loss average: ABXI's code averages the InfoNCE per user over the positions of each target
  domain, then over the batch, and sums the domains (``loss_average: user``); the default
  ``position`` is the mean over all positions, as every other model here. On Food-Kitchen
  validation ``user`` did worse (docs/results.md), so it is an option, not the default.
- Padding: our attention masks padding keys; ABXI's lets every query attend to the zero
  vectors of padding, which act as a sink (``pad_sink: true``, computed as one key whose logit
  carries log of their count). The count is causal: a query of a stream sees the zero slots of
  the merged window at or before its own merged position (padding and, for a domain stream, the
  other domains' events). That is ABXI's count in training, where its domain streams sit on the
  merged timeline; at evaluation ABXI packs a domain's events to the right of a fresh window, so
  its count there is the window's width minus the domain's events.
- Initialisation: ``init: abxi`` is ABXI's (``_abxi_init``); ``torch`` keeps torch's defaults.
- Window: ABXI trims training and evaluation inputs to ``len_max - 3`` = 47 events. With
  ``max_len: 47`` (the ``abxi-paper`` preset) our windows are that wide, so evaluation inputs
  are cut to the training length and the sink counts are ABXI's; ``evaluate.input_window:
  train`` cuts evaluation inputs to the longest training input for any model and window.
- The SwiGLU hidden size is ``ffn_dim`` (default round(8 d / 3), 683 at d 256, where the
  public code fixes 680).

GCA over ABXI (``gca_layers``; the model ``abxi_gca`` has ``[0]``): seeds 002/003 insert Gated
Cross-Attention into ABXI. GCA[0] refines the domain streams' embeddings, GCA[1] the domain
streams after the shared encoder, each stream a from the other domains' events that happened
before the query (the :class:`cdsr.models.gca.GCA` module, its gate, alpha and LayerNorm options,
and its |cos(X, X')| measurement after every validation epoch). NOTE: the merged stream gets no
GCA (it already attends across domains), as in our dual-stream host.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from cdsr.models.base import SeqRecModel, Vocab
from cdsr.models.gca import GCA, validation_orthogonality
from cdsr.models.layers import (
    Dropout,
    MultiHeadAttention,
    dropout_rows,
    attention_mask,
    domain_softmax_loss,
    domain_streams,
    dot_scores,
    last_stream_states,
    loss_weights,
    pack_rows,
    sample_domain_negatives,
    sampled_softmax_loss,
    shared_negatives_softmax_loss,
    stream_states,
    subsequence_positions,
    unpack_rows,
)


@dataclass(frozen=True)
class ABXIConfig:
    d: int = 256
    heads: int = 2
    dropout: float = 0.5
    max_len: int = 50
    # dLoRA / iLoRA ranks (ABXI's rd / ri): 16 / 64, ABXI's Food-Kitchen setting, which Food-Kitchen
    # validation preferred (by a hair) to 8 / 8 (docs/results.md "Which of ABXI's settings help")
    rank_domain: int = 16
    rank_invariant: int = 64
    ffn_dim: int = 0  # SwiGLU hidden size; 0: round(8 d / 3)
    loss: Literal["sampled", "ce"] = "sampled"
    n_negatives: int = 128  # per domain, for loss: sampled
    # sampled negatives drawn per training position (ABXI's code) or per sequence, shared by its
    # positions (one GEMM per sequence instead of a gather per position: see
    # layers.shared_negatives_softmax_loss)
    negatives: Literal["position", "sequence"] = "position"
    temperature: float = 0.75
    # position index of a stream's events: "first" counts from its first event, "last" back from
    # its last (ABXI's code); "user" averages the loss per user and target domain as ABXI's code
    positions: Literal["first", "last"] = "last"
    # dropout on the attention probabilities; None: ``dropout`` (ABXI's code has none there)
    attn_dropout: float | None = None
    loss_average: Literal["position", "user"] = "position"
    # ABXI's padding: queries also attend to the zero vectors of padding (a sink) rather than
    # masking them (see MultiHeadAttention's ``sink``; counted causally, module docstring)
    pad_sink: bool = False
    # "abxi": ABXI's initialisation (Linear normal(0.02) with zero bias, the attention's input
    # projection Xavier-uniform, embeddings truncated normal(0.02) in +-0.04); "torch": torch's
    # layer defaults with normal(0.02) embeddings
    init: Literal["torch", "abxi"] = "torch"
    # compute the encoder on valid positions only (:meth:`ABXI._packed_block`; same numbers)
    packed: bool = True

    # GCA over ABXI (module docstring): 0 after the embeddings, 1 after the encoder
    gca_layers: tuple[int, ...] = ()
    gate: Literal["sigmoid", "tanh"] = "sigmoid"
    alpha: Literal["scalar", "channel"] = "scalar"
    alpha_init: float = 0.0
    gca_ln: bool = True
    gca_heads: int = 0  # 0: heads
    measure: bool = True  # |cos(X, X')| on validation after each validation epoch

    def __post_init__(self):
        if self.attn_dropout is not None and not 0.0 <= self.attn_dropout < 1.0:
            raise ValueError(f"abxi: attn_dropout must be in [0, 1) or null, got {self.attn_dropout}")
        if self.temperature <= 0 or self.rank_domain < 1 or self.rank_invariant < 1 or self.n_negatives < 1:
            raise ValueError("abxi: temperature > 0, ranks >= 1 and n_negatives >= 1 are required")
        if any(k not in (0, 1) for k in self.gca_layers) or len(set(self.gca_layers)) != len(self.gca_layers):
            raise ValueError(f"abxi: gca_layers {list(self.gca_layers)}: distinct values of 0 (after the embeddings) "
                             "and 1 (after the encoder)")


@dataclass(frozen=True)
class ABXIGCAConfig(ABXIConfig):
    gca_layers: tuple[int, ...] = (0,)


class SwiGLU(nn.Module):
    """W3 (SiLU(W2 x) * W1 x), no biases: the FFN and the projectors of ABXI."""

    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.w12 = nn.Linear(d, 2 * hidden, bias=False)
        self.w3 = nn.Linear(hidden, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.w12(x).chunk(2, -1)
        return self.w3(F.silu(b) * a)


class LoRA(nn.Module):
    """x (A B): a rank-r map, B zero at start so an adapter begins as the identity residual."""

    def __init__(self, d: int, rank: int):
        super().__init__()
        self.A = nn.Parameter(torch.randn(d, rank) * 0.02)
        self.B = nn.Parameter(torch.zeros(rank, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.A) @ self.B


class ABXI(SeqRecModel):
    def __init__(self, cfg: ABXIConfig, vocab: Vocab):
        super().__init__(vocab)
        self.cfg = cfg
        d, D = cfg.d, vocab.n_domains
        hidden = cfg.ffn_dim or round(8 * d / 3)
        self.item_emb = nn.Embedding(vocab.n_items + 1, d, padding_idx=0)
        self.pos_emb = nn.Embedding(cfg.max_len, d)
        self.drop = Dropout(cfg.dropout)
        self.attn = MultiHeadAttention(d, cfg.heads, cfg.dropout if cfg.attn_dropout is None else cfg.attn_dropout)
        self.ln_attn = nn.LayerNorm(d)
        self.ffn = SwiGLU(d, hidden)
        # stream 0 is the merged sequence, stream 1 + a domain a's subsequence
        self.dlora = nn.ModuleList(LoRA(d, cfg.rank_domain) for _ in range(1 + D))
        self.ln_ffn = nn.ModuleList(nn.LayerNorm(d) for _ in range(1 + D))
        self.proj_i = SwiGLU(d, hidden)
        self.ilora = nn.ModuleList(LoRA(d, cfg.rank_invariant) for _ in range(D))
        self.proj = nn.ModuleList(SwiGLU(d, hidden) for _ in range(D))
        self.ln_inv = nn.ModuleList(nn.LayerNorm(d) for _ in range(D))
        self.ln_dom = nn.ModuleList(nn.LayerNorm(d) for _ in range(D))
        self.gca = nn.ModuleDict({str(k): GCA(cfg, D) for k in sorted(cfg.gca_layers)})
        self.register_buffer("empty", torch.zeros(D, d), persistent=False)
        ranges = torch.tensor(vocab.domain_ranges, dtype=torch.long)
        self.register_buffer("dom_lo", ranges[:, 0], persistent=False)
        self.register_buffer("dom_size", ranges[:, 1] - ranges[:, 0] + 1, persistent=False)
        if cfg.init == "abxi":
            self._abxi_init()
        else:
            nn.init.normal_(self.item_emb.weight, std=0.02)
            nn.init.normal_(self.pos_emb.weight, std=0.02)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    def _abxi_init(self) -> None:
        """ABXI's ``init_weights`` (models/utils/initialization.py of its code): every Linear
        normal(0, 0.02) with zero bias, except the attention's input projection, which torch's
        ``nn.MultiheadAttention`` initialises Xavier-uniform (bias zero); embeddings truncated
        normal(0.02) cut at +-0.04; LayerNorms (1, 0); LoRA as built (A normal(0.02), B zero).
        GCA modules keep their own initialisation."""
        for name, mod in self.named_modules():
            if name.startswith("gca"):
                continue
            if isinstance(mod, nn.Linear):
                if mod is self.attn.qkv:
                    nn.init.xavier_uniform_(mod.weight)
                else:
                    nn.init.normal_(mod.weight, std=0.02)
                if mod.bias is not None:
                    nn.init.zeros_(mod.bias)
            elif isinstance(mod, nn.Embedding):
                nn.init.trunc_normal_(mod.weight, std=0.02, a=-0.04, b=0.04)

    def _embed(self, items: torch.Tensor, valid: torch.Tensor, slots: torch.Tensor | None = None,
               window: int = 0) -> torch.Tensor:
        """items / valid [B, L'] (right-aligned) -> the stream's input [B, L', d]. A domain stream
        gives ``slots`` [B, L'], its entries' indices in the merged window of length ``window``
        (the merged stream: None, its own width); ``positions: last`` embeds window - 1 - slot,
        the steps before the window's end."""
        L = items.shape[1] if slots is None else window
        if L > self.cfg.max_len:
            raise ValueError(f"sequence length {L} > max_len {self.cfg.max_len}")
        if self.cfg.positions == "first":
            pos = subsequence_positions(valid)
        elif slots is None and not self.training:  # the merged stream's rows share their positions
            pos = torch.arange(L - 1, -1, -1, device=items.device)
        else:
            pos = L - 1 - (torch.arange(L, device=items.device).expand_as(items) if slots is None else slots)
        if not self.training:
            # evaluation: padding rows are left as they are (item 0's zero embedding plus a
            # position): every path reads them through masked keys only, which weigh nothing
            return self.item_emb(items) + self.pos_emb(pos)
        return self.drop(self.item_emb(items) + self.pos_emb(pos)) * valid[..., None]

    def _block(self, x: torch.Tensor, valid: torch.Tensor, k: int, last_only: bool = False,
               slots: torch.Tensor | None = None) -> torch.Tensor:
        """The shared encoder with stream k's dLoRA: [B, L', d] -> [B, L', d] (``last_only``:
        [B, 1, d], the last position, which scoring needs alone). Causal: position j sees
        positions <= j of its own stream only. ``slots`` [B, L']: a domain stream's merged
        positions (None: the merged stream), which ``pad_sink`` counts its zero keys from."""
        sink = None
        if self.cfg.pad_sink:
            at = torch.arange(x.shape[1], device=x.device).expand_as(valid) if slots is None else slots
            sink = (at + 1 - valid.long().cumsum(1)).clamp_min(0)
        if not last_only and self.cfg.packed:
            return self._packed_block(x, valid, k, sink)
        # in training, keys and values of the valid positions only; in evaluation the attention
        # projects no key or value (MultiHeadAttention._last_query) and takes x as it is
        if last_only and self.cfg.packed and self.training:
            xv, rows = pack_rows(x, valid)
            a, _ = self.attn(xv, attention_mask(valid, causal=True), last_only=True, sink=sink, rows=rows)
        else:
            a, _ = self.attn(x, attention_mask(valid, causal=True), last_only=last_only, sink=sink)
        if last_only:
            x, valid = x[:, -1:], valid[:, -1:]
        h = self.ln_attn(x + self.drop(a)) * valid[..., None]
        return self.ln_ffn[k](h + self.drop(self.ffn(h)) + self.drop(self.dlora[k](h))) * valid[..., None]

    def _packed_block(self, x: torch.Tensor, valid: torch.Tensor, k: int, sink: torch.Tensor | None) -> torch.Tensor:
        """:meth:`_block` computed on the valid positions only (the projections, FFN, dLoRA and
        LayerNorms; attention itself needs the padded layout): about half the rows of a merged
        window and a quarter of a domain stream's are padding. The same numbers, dropout masks
        included (:func:`dropout_rows`)."""
        B, L, d = x.shape
        xv, rows = pack_rows(x, valid)
        a, _ = self.attn(xv, attention_mask(valid, causal=True), sink=sink, rows=rows)
        p, train, shape = self.cfg.dropout, self.training, (B * L, d)
        h = self.ln_attn(xv + dropout_rows(a, p, train, rows, shape))
        out = self.ln_ffn[k](h + dropout_rows(self.ffn(h), p, train, rows, shape)
                             + dropout_rows(self.dlora[k](h), p, train, rows, shape))
        return unpack_rows(out, rows, B, L)

    def _domain_streams(self, items, doms, mask, layout, stats=None, last_only=False) -> list[torch.Tensor]:
        """Per domain a: its encoded stream [B, L_a, d] (``last_only``: [B, 1, d]), with GCA."""
        midx, valid = [o for o, _ in layout], [v for _, v in layout]

        def cross(k: int, xs: list[torch.Tensor]) -> list[torch.Tensor]:
            if str(k) not in self.gca:
                return xs
            acc = None if stats is None else stats.setdefault(k, xs[0].new_zeros(len(xs), 2, dtype=torch.float32))
            return self.gca[str(k)](xs, midx, valid, acc)

        xs = cross(0, [self._embed(items.gather(1, o), v, o, items.shape[1]) for o, v in layout])
        last_only = last_only and "1" not in self.gca  # GCA[1] reads every position of the other streams
        xs = [self._block(x, v, 1 + a, last_only, o) for a, (x, v, o) in enumerate(zip(xs, valid, midx))]
        return cross(1, xs)

    def encode(self, batch: dict[str, torch.Tensor], stats: dict[int, torch.Tensor] | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (h^x [B, L, d], S [B, L, D, d]: each domain stream at its last event <= i).
        ``stats``: GCA placement -> [D, 2] |cos(X, X')| accumulators."""
        items, doms, mask = batch["items"], batch["domains"], batch["mask"]
        hx = self._block(self._embed(items, mask), mask, 0)
        layout = domain_streams(doms, mask, self.vocab.n_domains)
        return hx, stream_states(self._domain_streams(items, doms, mask, layout, stats), layout, doms, mask, self.empty)

    def represent(self, hx: torch.Tensor, S: torch.Tensor, tdom: torch.Tensor) -> torch.Tensor:
        """hx [N, d], S [N, D, d], tdom [N] -> r [N, d] (module docstring)."""
        inv = hx + self.drop(self.proj_i(hx))
        out = torch.zeros_like(hx)
        for t in range(self.vocab.n_domains):  # D is small; each row takes its target's branch
            rows = (tdom == t).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            h, s = hx.index_select(0, rows), S[:, t].index_select(0, rows)
            r = self.ln_inv[t](inv.index_select(0, rows) + self.drop(self.ilora[t](h))) + \
                self.ln_dom[t](s + self.drop(self.proj[t](s)))
            out = out.index_copy(0, rows, r.to(out.dtype))
        return out

    def loss(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        hx, S = self.encode(batch)
        valid = batch["mask"] & (batch["targets"] > 0)
        tgt, tdom = batch["targets"][valid], batch["target_domains"][valid]
        q = self.represent(hx[valid], S[valid], tdom)
        w = None
        if self.cfg.loss_average == "user":
            rows = valid.nonzero()[:, 0]
            w = loss_weights(rows, tdom, valid.shape[0], self.vocab.n_domains)
        if self.cfg.loss == "ce":
            return {"loss": domain_softmax_loss(q / self.cfg.temperature, tgt, tdom, self.item_emb.weight,
                                                self.vocab.domain_ranges, row_weight=w)}
        if self.cfg.negatives == "sequence":
            B = valid.shape[0]
            neg = torch.cat([sample_domain_negatives(torch.full((B,), a, dtype=torch.long, device=tgt.device), self.dom_lo,
                                                     self.dom_size, self.cfg.n_negatives)
                             for a in range(self.vocab.n_domains)], 1)
            return {"loss": shared_negatives_softmax_loss(q, valid.nonzero()[:, 0], self.item_emb.weight, tgt, neg,
                                                          1.0 / self.cfg.temperature, row_weight=w)}
        neg = torch.cat([sample_domain_negatives(torch.full_like(tdom, a), self.dom_lo, self.dom_size,
                                                 self.cfg.n_negatives) for a in range(self.vocab.n_domains)], 1)
        return {"loss": sampled_softmax_loss(q, self.item_emb.weight, tgt, neg, 1.0 / self.cfg.temperature,
                                             row_weight=w)}

    def score_parts(self, batch: dict[str, torch.Tensor]):
        """The last position only: a domain stream is right-aligned, so its state at the merged
        window's end is its last entry (or ``empty`` when the domain has no event)."""
        items, doms, mask = batch["items"], batch["domains"], batch["mask"]
        hx = self._block(self._embed(items, mask), mask, 0, last_only=True)[:, 0]
        layout = domain_streams(doms, mask, self.vocab.n_domains)
        xs = self._domain_streams(items, doms, mask, layout, last_only=True)
        return self.represent(hx, last_stream_states(xs, layout, self.empty), batch["target_domain"]), self.item_emb.weight, None

    def epoch_diagnostics(self, data, eval_cfg, device) -> dict[str, float]:
        """With GCA: its |cos(X, X')| and gates on the validation histories (the loop's hook)."""
        if not (self.gca and self.cfg.measure):
            return {}
        return validation_orthogonality(self, data, eval_cfg, device)

    def score(self, batch: dict[str, torch.Tensor], candidates: torch.Tensor | None = None) -> torch.Tensor:
        q, table, _ = self.score_parts(batch)
        return dot_scores(q, table, candidates)
