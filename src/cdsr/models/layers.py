"""Shared transformer pieces: pre-LN blocks with a fused attention path (SDPA) and an explicit
path that also returns the attention probabilities (needed by AutoCDSR's cross-domain
attention mass, computed inside the forward pass)."""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn


def attention_mask(valid: torch.Tensor, causal: bool) -> torch.Tensor:
    """[B, 1, L, L] boolean mask (True = may attend) over valid keys; causal: key j <= query i.

    The diagonal is always allowed so a padding query never has an empty row (its output is
    never used, but an empty row would give NaN through softmax).
    """
    L = valid.shape[1]
    allowed = valid[:, None, None, :].expand(-1, 1, L, L)
    if causal:
        allowed = allowed & torch.ones(L, L, dtype=torch.bool, device=valid.device).tril()
    return allowed | torch.eye(L, dtype=torch.bool, device=valid.device)


class _Dropout(torch.autograd.Function):
    """Inverted dropout whose mask comes from ``torch.rand`` (on the CPU about 3x faster than the
    ``bernoulli_`` behind ``F.dropout``, the largest single cost of a small model's step there).
    The mask, scaled by 1 / (1 - p), is kept in the input's dtype for the backward pass. It
    draws from the global generator, so a seed (and a checkpoint's RNG state) fixes it."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:
        mask = torch.rand(x.shape, device=x.device).ge_(p).mul_(1.0 / (1.0 - p)).to(x.dtype)
        ctx.save_for_backward(mask)
        return x * mask

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (mask,) = ctx.saved_tensors
        return grad * mask, None


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """``F.dropout`` with a faster mask (see :class:`_Dropout`); identity when not training or p = 0."""
    if not training or p == 0.0:
        return x
    if p >= 1.0:
        return x * 0.0
    return _Dropout.apply(x, p)


def dropout_rows(x: torch.Tensor, p: float, training: bool, rows: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """:func:`dropout` of the rows ``rows`` of a ``shape`` [R, d] tensor, given packed as x [n, d]
    (e.g. the valid positions of a padded batch): the mask is drawn for the whole ``shape`` and
    its rows taken, so the random numbers, and the result, are those of the unpacked tensor's."""
    if not training or p == 0.0:
        return x
    mask = torch.rand(shape, device=x.device).index_select(0, rows).ge_(p).mul_(1.0 / (1.0 - p)).to(x.dtype)
    return x * mask


def pack_rows(x: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, L, d], valid [B, L] -> (its valid rows [n, d], their flat indices ``rows`` [n] in
    the [B * L, d] layout): what a row-wise layer computes on instead of the padding."""
    rows = valid.reshape(-1).nonzero().squeeze(1)
    return x.reshape(-1, x.shape[-1]).index_select(0, rows), rows


def unpack_rows(xv: torch.Tensor, rows: torch.Tensor, B: int, L: int) -> torch.Tensor:
    """:func:`pack_rows` undone: [n, d] -> [B, L, d], zero at the rows not packed."""
    return xv.new_zeros(B * L, xv.shape[-1]).index_copy(0, rows, xv).view(B, L, -1)


class Dropout(nn.Module):
    """``nn.Dropout`` with the faster mask of :func:`dropout`."""

    def __init__(self, p: float = 0.5):
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class MultiHeadAttention(nn.Module):
    def __init__(self, d: int, heads: int, dropout: float):
        super().__init__()
        if d % heads:
            raise ValueError(f"d={d} is not divisible by heads={heads}")
        self.h, self.dk, self.p = heads, d // heads, dropout
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, need_probs: bool = False, last_only: bool = False,
                sink: torch.Tensor | None = None, rows: torch.Tensor | None = None):
        """x [B, L, d], mask [B, 1, L, L] -> (y [B, L, d], probs [B, h, L, L] or None);
        ``last_only``: the last position's query only (y [B, 1, d], probs [B, h, 1, L]).

        ``sink`` [B, L] (long): each query also attends to this many zero input vectors, ABXI's
        padding (its attention masks no key, and padding enters as zeros). A zero vector's key
        and value are the projection biases, so n of them are one key b_k with log n added to
        its logit and value b_v (n = 0: no such key). ``probs`` then has L + 1 columns, the sink
        first.

        ``rows`` [n]: x is packed, x [n, d] holding rows ``rows`` of the [B * L, d] batch (its valid
        positions; B, L from ``mask``), and so is y [n, d] (``last_only``: y [B, 1, d], the last
        position must be valid). The projections then run on those rows only; the other
        positions' keys must be masked (their values are zero).

        ``last_only`` without dropout or probabilities and with x padded (``rows`` None) takes
        :meth:`_last_query`, which projects no key or value."""
        if last_only and rows is None and not need_probs and not (self.training and self.p > 0):
            return self._last_query(x, mask, sink), None
        if rows is None:
            B, L, d = x.shape
            qkv = self.qkv(x)
        else:
            (B, L), d = (mask.shape[0], mask.shape[-1]), x.shape[-1]
            packed = self.qkv(x)
            qkv = packed.new_zeros(B * L, 3 * d).index_copy(0, rows, packed)
        q, k, v = qkv.view(B, L, 3, self.h, self.dk).permute(2, 0, 3, 1, 4)
        if last_only:
            q, mask, L = q[:, :, -1:], mask[:, :, -1:], 1
            sink = None if sink is None else sink[:, -1:]
        if sink is not None:
            bk, bv = (b.to(k.dtype).view(1, self.h, 1, self.dk).expand(B, -1, -1, -1)
                      for b in self.qkv.bias[d:].view(2, d))
            k, v = torch.cat([bk, k], 2), torch.cat([bv, v], 2)
            logn = sink.to(torch.float32).log().view(B, 1, L, 1)
            mask = torch.cat([logn, torch.zeros(mask.shape, device=x.device).masked_fill_(~mask, float("-inf"))], -1)
            mask = mask.to(q.dtype)
        drop = self.training and self.p > 0
        if not (need_probs or drop):  # the fused kernel; with dropout it falls back to a slower path on the CPU
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            probs = None
        else:
            s = (q @ k.transpose(-2, -1)) / math.sqrt(self.dk)
            s = s + mask if mask.dtype != torch.bool else s.masked_fill(~mask, float("-inf"))
            p = s.softmax(-1)  # after softmax, before dropout
            probs = p if need_probs else None
            y = dropout(p, self.p, self.training) @ v
        if rows is not None and not last_only:
            return self.out(y.transpose(1, 2).reshape(B * L, d).index_select(0, rows)), probs
        return self.out(y.transpose(1, 2).reshape(B, L, d)), probs

    def _last_query(self, x: torch.Tensor, mask: torch.Tensor, sink: torch.Tensor | None) -> torch.Tensor:
        """The last position's attention output, x [B, L, d] -> y [B, 1, d], with the key and
        value projections folded into the one query (the absorption of DeepSeek-V2's MLA): per
        head h, q_h . (W_k x_j + b_k) = (W_k^T q_h) . x_j + q_h . b_k and sum_j p_j (W_v x_j + b_v)
        = W_v (sum_j p_j x_j) + b_v (the p_j sum to 1). So no [B, L, 2 d] keys and values are
        computed: two batched products with x, O(B L d) instead of O(B L d^2). Same math as the
        general path; float sums in another order. A sink's zero vectors have key b_k and value
        b_v, so it is one more logit, q_h . b_k + log n, and adds nothing to sum_j p_j x_j."""
        B, L, d = x.shape
        h, dk = self.h, self.dk
        w, b = self.qkv.weight.to(x.dtype), self.qkv.bias.to(x.dtype)
        q = F.linear(x[:, -1], w[:d], b[:d]).view(B, h, dk)
        wk, wv = w[d:2 * d].view(h, dk, d), w[2 * d:].view(h, dk, d)
        scale = 1.0 / math.sqrt(dk)
        qk = torch.einsum("bhk,hkd->bhd", q, wk) * scale  # [B, h, d]
        c = (q * b[d:2 * d].view(h, dk)).sum(-1, keepdim=True) * scale  # [B, h, 1]: q_h . b_k
        logits = torch.bmm(qk, x.transpose(1, 2)) + c  # [B, h, L]
        m = mask[:, 0, -1]  # [B, L]: the last query's row
        logits = logits.masked_fill(~m[:, None, :], float("-inf")) if m.dtype == torch.bool else logits + m[:, None, :]
        if sink is not None:
            logn = sink[:, -1].to(logits.dtype).log().view(B, 1, 1)
            logits = torch.cat([c + logn, logits], -1)
        p = logits.softmax(-1)  # [B, h, L (+ 1, the sink first)]
        ctx = torch.bmm(p[..., -L:], x)  # [B, h, d]
        y = torch.einsum("bhd,hkd->bhk", ctx, wv) + b[2 * d:].view(h, dk)
        return self.out(y.reshape(B, 1, d))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + Drop(MHA(LN(x))), then x + Drop(FFN(LN(x)))."""

    def __init__(self, d: int, heads: int, dropout: float, ffn_mult: int = 4, ffn_dim: int | None = None):
        super().__init__()
        hidden = ffn_dim or ffn_mult * d
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = MultiHeadAttention(d, heads, dropout)
        self.ffn = nn.Sequential(nn.Linear(d, hidden), nn.GELU(), Dropout(dropout), nn.Linear(hidden, d))
        self.drop = Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, need_probs: bool = False, last_only: bool = False,
                valid: torch.Tensor | None = None):
        """``last_only``: the output of the last position only ([B, 1, d]); it still reads
        every position as keys and values. ``valid`` [B, L]: the LayerNorms, projections and
        FFN run on the valid rows alone (attention itself keeps the padded layout), and the other
        rows come out zero (only masked keys read them). The same numbers at the valid rows,
        dropout masks included (:func:`dropout_rows` draws them for the padded shape)."""
        if valid is not None and not last_only:
            B, L, d = x.shape
            xv, rows = pack_rows(x, valid)
            a, probs = self.attn(self.ln1(xv), mask, need_probs, rows=rows)
            p, train = self.drop.p, self.training
            xv = xv + dropout_rows(a, p, train, rows, (B * L, d))
            lin1, act, ffn_drop, lin2 = self.ffn
            hid = act(lin1(self.ln2(xv)))
            hid = dropout_rows(hid, ffn_drop.p, train, rows, (B * L, hid.shape[-1]))
            xv = xv + dropout_rows(lin2(hid), p, train, rows, (B * L, d))
            return unpack_rows(xv, rows, B, L), probs
        a, probs = self.attn(self.ln1(x), mask, need_probs, last_only)
        x = (x[:, -1:] if last_only else x) + self.drop(a)
        return x + self.drop(self.ffn(self.ln2(x))), probs


class Encoder(nn.Module):
    """A stack of blocks with a final LayerNorm. Returns (h [B, L, d], per-layer probs)."""

    def __init__(self, d: int, layers: int, heads: int, dropout: float, ffn_dim: int | None = None):
        super().__init__()
        self.blocks = nn.ModuleList(Block(d, heads, dropout, ffn_dim=ffn_dim) for _ in range(layers))
        self.ln = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, need_probs: bool = False, last_only: bool = False,
                valid: torch.Tensor | None = None):
        """``last_only`` (scoring the next item): h [B, 1, d] of the last position, which the
        last block computes alone (its other outputs feed nothing): about half the work of a
        2-block encoder. ``valid`` [B, L]: the other blocks compute the valid rows only
        (:class:`Block`)."""
        probs = []
        for k, blk in enumerate(self.blocks):
            x, p = blk(x, mask, need_probs, last_only and k == len(self.blocks) - 1, valid)
            probs.append(p)
        return self.ln(x), probs


def sample_domain_negatives(domains: torch.Tensor, lo: torch.Tensor, size: torch.Tensor, n: int) -> torch.Tensor:
    """[..., n] uniform item ids of each entry's domain: lo + floor(rand * size) (global RNG).

    domains [...] long; lo, size [D] first item id / number of items of each domain.
    """
    lo_, size_ = lo[domains].unsqueeze(-1), size[domains].unsqueeze(-1)
    u = torch.rand(*domains.shape, n, device=domains.device)
    return lo_ + torch.minimum((u * size_).long(), size_ - 1)  # min: guards float rounding to 1


# Cells of one chunk of logits in the fused cross-entropy: 2^21 (8 MiB in fp32) stays in the
# caches of one CPU socket, so the [N, V] logits are never written to main memory (at d = 64
# the logits GEMM is memory-bound: reading and writing them costs more than computing them).
CE_CHUNK_CELLS = 1 << 21
# ... but at least this many rows per chunk: each chunk reads the domain's whole item table, so
# for a huge domain (KuaiRand: 738k items) a cache-sized chunk of a few rows would stream the
# table from memory thousands of times per step; 64 rows amortise it against the logits.
CE_MIN_ROWS = 64


def compute_dtype(device: torch.device) -> torch.dtype:
    """The dtype matrix products run in: autocast's (bf16) where it is on, else float32."""
    kind = device.type if device.type in ("cpu", "cuda") else "cpu"
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else torch.float32


class _DomainSoftmaxCE(torch.autograd.Function):
    """Sum over rows of cross-entropy(h_i @ W[lo_d : hi_d + 1]^T (+ b), t_i - lo_d) for each
    row's target domain d, fused with its own gradient.

    The rows of each domain are taken in chunks of ``CE_CHUNK_CELLS // V_d``; per chunk the
    logits are computed, turned into log-probabilities (one fused pass), and, since the loss
    is a leaf of the graph, at once into the gradient p - onehot, which is multiplied back into
    dh (chunk x d) and accumulated into dW / db. The logits are never stored, so memory is
    O(chunk x V_d) instead of O(N x V_d), and backward only scales the stored gradients by the
    incoming scalar. Matrix products run in ``dtype``: float32 (exact log-softmax), or bf16
    under autocast (softmax in bf16 as well; gradients accumulated in float32, as autocast does).
    """

    @staticmethod
    def forward(ctx, h, weight, bias, targets, target_domains, ranges, dtype, grads, row_weight=None):
        # ``grads``: grad mode where the loss was asked for (forward itself runs without it)
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grads = grads and (need_h or need_w or need_b)
        ctx.h_dtype = h.dtype
        dh = torch.zeros(h.shape, dtype=torch.float32, device=h.device) if grads and need_h else None
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if grads and need_w else None
        db = torch.zeros(bias.shape, dtype=torch.float32, device=h.device) if grads and need_b else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        order = torch.argsort(target_domains, stable=True)
        counts = torch.bincount(target_domains, minlength=len(ranges)).tolist()
        hx, wx = h.to(dtype), weight.to(dtype)
        start = 0
        for d, n_d in enumerate(counts):
            if n_d == 0:
                continue
            lo, hi = ranges[d]
            rows_d = order[start:start + n_d]
            start += n_d
            w_d = wx[lo:hi + 1]
            chunk = max(CE_MIN_ROWS, CE_CHUNK_CELLS // (hi - lo + 1))
            for a in range(0, n_d, chunk):
                rows = rows_d[a:a + chunk]
                x = hx[rows]
                t = targets[rows] - lo
                logits = x @ w_d.T
                if bias is not None:
                    logits = logits + bias[lo:hi + 1].to(dtype)
                at = torch.arange(len(rows), device=h.device)
                rw = None if row_weight is None else row_weight[rows]
                if dtype == torch.float32:
                    logp = torch.log_softmax(logits, 1)
                    total -= _weighted_sum(logp[at, t], rw)
                    g = logp.exp_() if grads else None
                else:
                    # softmax straight into the reduced dtype: one pass, no float32 copy of the
                    # chunk (converting it costs more than the products at this size); the loss
                    # (for logging) is -log p_t, from the target's reduced-precision probability
                    g = torch.softmax(logits, 1)
                    total -= _weighted_sum(g[at, t].float().clamp_min(torch.finfo(torch.float32).tiny).log(), rw)
                if not grads:
                    continue
                g[at, t] -= 1.0
                if rw is not None:
                    g.mul_(rw.to(g.dtype)[:, None])
                if dh is not None:
                    dh[rows] = (g @ w_d).float()
                if dw is not None:
                    dw[lo:hi + 1] += (g.T @ x).float()
                if db is not None:
                    db[lo:hi + 1] += g.sum(0, dtype=torch.float32)
        ctx.save_for_backward(*(t for t in (dh, dw, db) if t is not None))
        ctx.have = (dh is not None, dw is not None, db is not None)
        return total

    @staticmethod
    def backward(ctx, grad):
        saved = iter(ctx.saved_tensors)
        dh, dw, db = (next(saved) if have else None for have in ctx.have)
        scale = grad.float()
        return (None if dh is None else (dh * scale).to(ctx.h_dtype), None if dw is None else dw * scale,
                None if db is None else db * scale, None, None, None, None, None, None)


def _weighted_sum(x: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    return x.sum() if w is None else (x * w).sum()


def loss_weights(rows: torch.Tensor, target_domains: torch.Tensor, batch: int, n_domains: int) -> torch.Tensor:
    """[N] float32 weights that turn a sum over training positions into ABXI's average: per
    user (batch row) the mean over its positions of each target domain, then the mean over the
    ``batch`` rows (a row without targets of domain t adds 0 to t's mean), summed over domains.

    rows / target_domains [N]: each position's batch row and its target's domain."""
    cell = rows * n_domains + target_domains
    count = torch.bincount(cell, minlength=batch * n_domains).float()
    return 1.0 / (batch * count[cell])


def domain_softmax_loss(h: torch.Tensor, targets: torch.Tensor, target_domains: torch.Tensor,
                        item_emb: torch.Tensor, domain_ranges: tuple[tuple[int, int], ...],
                        bias: torch.Tensor | None = None, row_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Full softmax cross-entropy of each target against the items of its own domain.

    h [N, d] query vectors, targets / target_domains [N]; item_emb [n_items + 1, d] (and
    ``bias`` [>= n_items + 1]). Domain d's items are the contiguous slice [lo_d, hi_d], so each
    position is scored against its slice only (N x V_d instead of N x V), in cache-sized chunks
    with the gradient fused in (:class:`_DomainSoftmaxCE`). Mean over the N positions, or with
    ``row_weight`` [N] the weighted sum (e.g. :func:`loss_weights`).
    """
    n = int(targets.numel())
    if n == 0:
        return (h.sum() + item_emb.sum() * 0) * 0.0  # keeps the graph connected
    ranges = tuple((int(lo), int(hi)) for lo, hi in domain_ranges)
    total = _DomainSoftmaxCE.apply(h, item_emb, bias, targets, target_domains, ranges, compute_dtype(h.device),
                                   torch.is_grad_enabled(), None if row_weight is None else row_weight.float())
    return total / n if row_weight is None else total


class _SampledSoftmaxCE(torch.autograd.Function):
    """Sum over rows of cross-entropy over [pos_i, neg_i1..neg_iR] of scale * q_i . T[id],
    negatives equal to the row's positive masked out, fused with its gradient.

    Per chunk of rows the candidates' table rows are gathered ([chunk, 1 + R, d], a few MiB),
    scored with one batched product and turned into the gradient of q; the table's gradient is
    one CSR sparse x dense product over the whole batch after the loop. The [N, 1 + R, d]
    gather of the whole batch (1.4 GiB at N 5,600, R 256, d 256), its dtype copies and its
    embedding backward are never made. Products in ``dtype``, log-softmax and gradient
    accumulation in float32. ``normalize``: score the L2-normalised rows (HSTU's cosine),
    dividing the scores by |e| rather than the rows. ``row_weight`` [N] float32: the sum over
    rows is weighted (the gradients with it).
    """

    @staticmethod
    def forward(ctx, q, table, pos, neg, scale, dtype, grads, normalize, row_weight=None):
        need_q, need_t = ctx.needs_input_grad[:2]
        grads = grads and (need_q or need_t)
        ctx.q_dtype = q.dtype
        N, d = q.shape
        R = neg.shape[1]
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device) if grads and need_q else None
        dt = torch.zeros(table.shape, dtype=torch.float32, device=q.device) if grads and need_t else None
        total = torch.zeros((), dtype=torch.float32, device=q.device)
        qx = q.to(dtype)
        tx = table.to(dtype)  # one copy per call: the gathers then move half the bytes in bf16
        # float32 norms whatever autocast says (F.normalize's eps)
        norms = torch.linalg.vector_norm(table.float(), dim=-1, dtype=torch.float32).clamp_min(1e-12) if normalize \
            else None
        chunk = max(1, CE_CHUNK_CELLS // ((R + 1) * d))
        # d loss / d table is a sparse product: dt = A^T x, A [N, V] holding each row's score
        # gradients at its candidates' ids. Its values are kept per chunk and the product is one
        # CSR SpMM after the loop: scattering [c, 1 + R, d] outer products row by row moves
        # several times the bytes, and this loop is bound by memory traffic, not by FLOPs.
        a_all = torch.empty((N, R + 1), dtype=torch.float32, device=q.device) if dt is not None else None
        # normalize: the -(v . q) / |e|^2 e part of each row's gradient is a multiple of the
        # table row itself, so its coefficients are summed per id and applied once at the end
        coef = torch.zeros(table.shape[0], dtype=torch.float32, device=q.device) if normalize and dt is not None \
            else None
        for a in range(0, N, chunk):
            ids = torch.cat([pos[a:a + chunk, None], neg[a:a + chunk]], 1)  # [c, 1 + R]
            flat = ids.reshape(-1)
            # index_select: several times faster than advanced indexing for row gathers on the CPU
            E = tx.index_select(0, flat).view(*ids.shape, d)  # [c, 1 + R, d]
            x = qx[a:a + chunk]
            s = torch.bmm(E, x[:, :, None])[:, :, 0].float()  # e . q
            if normalize:  # v . q = (e . q) / |e|: the rows are never divided, only the scores
                inv = 1.0 / norms.index_select(0, flat).view(ids.shape)
                s = s * inv
            logits = s * scale
            logits[:, 1:].masked_fill_(ids[:, 1:] == ids[:, :1], float("-inf"))
            logp = torch.log_softmax(logits, 1)
            rw = None if row_weight is None else row_weight[a:a + chunk]
            total -= _weighted_sum(logp[:, 0], rw)
            if not grads:
                continue
            g = logp.exp_()
            g[:, 0] -= 1.0
            g = g * (scale if rw is None else rw[:, None] * scale)  # d loss / d (v . q)
            # d (v . q) / d e = (q - (v . q) v) / |e| = q / |e| - (v . q) / |e|^2 e
            a_q = g * inv if normalize else g
            if dq is not None:  # d (v . q) / d q = v = e / |e|
                dq[a:a + chunk] = torch.bmm(a_q.to(dtype)[:, None, :], E)[:, 0].float()
            if a_all is not None:
                a_all[a:a + chunk] = a_q
                if coef is not None:
                    coef.index_add_(0, flat, (g * s * inv * inv).reshape(-1))
        if a_all is not None:
            ids = torch.cat([pos[:, None], neg], 1).reshape(-1)
            order = torch.argsort(ids, stable=True)  # stable: the same sums in the same order
            crow = torch.zeros(table.shape[0] + 1, dtype=torch.int64, device=q.device)
            crow[1:] = torch.bincount(ids, minlength=table.shape[0]).cumsum(0)
            cols = torch.div(order, R + 1, rounding_mode="floor")  # the row of each candidate
            with warnings.catch_warnings():  # "CSR support is in beta": SpMM is all we use of it
                warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
                At = torch.sparse_csr_tensor(crow, cols, a_all.reshape(-1)[order], (table.shape[0], N),
                                             check_invariants=False)
            with torch.autocast(q.device.type if q.device.type in ("cpu", "cuda") else "cpu", enabled=False):
                dt += At @ q.detach().to(dtype).float()  # sparse products are float32-only
            if coef is not None:
                dt -= coef[:, None] * table.detach().float()
        ctx.save_for_backward(*(t for t in (dq, dt) if t is not None))
        ctx.have = (dq is not None, dt is not None)
        return total

    @staticmethod
    def backward(ctx, grad):
        saved = iter(ctx.saved_tensors)
        dq, dt = (next(saved) if have else None for have in ctx.have)
        scale = grad.float()
        return (None if dq is None else (dq * scale).to(ctx.q_dtype), None if dt is None else dt * scale,
                None, None, None, None, None, None, None)


def sampled_softmax_loss(q: torch.Tensor, table: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor,
                         scale: float = 1.0, normalize: bool = False,
                         row_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Sampled softmax: each row ranks its positive ``pos`` [N] against its negatives ``neg``
    [N, R] (ids into ``table`` [V, d]; a negative equal to the positive is masked), scores
    ``scale * q . table[id]`` (``normalize``: of the L2-normalised rows); mean over the N rows,
    or with ``row_weight`` [N] the weighted sum (:class:`_SampledSoftmaxCE`)."""
    n = int(pos.numel())
    if n == 0:
        return (q.sum() + table.sum() * 0) * 0.0
    total = _SampledSoftmaxCE.apply(q, table, pos, neg, float(scale), compute_dtype(q.device), torch.is_grad_enabled(),
                                    normalize, None if row_weight is None else row_weight.float())
    return total / n if row_weight is None else total


def shared_negatives_softmax_loss(q: torch.Tensor, rows: torch.Tensor, table: torch.Tensor, pos: torch.Tensor,
                                  neg: torch.Tensor, scale: float, row_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Sampled softmax whose negatives are shared by the positions of one sequence: position n
    (of batch row ``rows[n]``) ranks its positive ``pos[n]`` against ``neg[rows[n]]`` (a
    negative equal to the positive is masked), scores ``scale * q . table[id]``.

    q [N, d], rows / pos [N], neg [B, R] (ids into ``table`` [V, d]). The negatives' scores of a
    row's positions are one product ``Q_b [L_b, d] x E_b^T [d, R]``, batched over rows
    (positions laid out [B, Lmax, d]): B x R table rows are gathered instead of N x R, and the
    products are GEMMs, not the per-position GEMVs of :class:`_SampledSoftmaxCE`. Mean over the
    N positions, or with ``row_weight`` [N] the weighted sum."""
    n = int(pos.numel())
    if n == 0:
        return (q.sum() + table.sum() * 0) * 0.0
    B, R = neg.shape
    counts = torch.bincount(rows, minlength=B)
    slot = torch.arange(n, device=q.device) - (torch.cumsum(counts, 0) - counts)[rows]  # index within its row
    Lmax = int(counts.max())
    dt = compute_dtype(q.device)
    Q = q.new_zeros(B, Lmax, q.shape[1], dtype=dt).index_put((rows, slot), q.to(dt))
    E = table.to(dt).index_select(0, neg.reshape(-1)).view(B, R, -1)
    s_neg = torch.bmm(Q, E.transpose(1, 2))[rows, slot].float()  # [N, R]
    s_pos = (q.to(dt) * table.to(dt).index_select(0, pos)).sum(-1, dtype=torch.float32)  # [N]
    logits = torch.cat([s_pos[:, None], s_neg], 1) * scale
    logits[:, 1:] = logits[:, 1:].masked_fill(neg[rows] == pos[:, None], float("-inf"))
    nll = -torch.log_softmax(logits, 1)[:, 0]
    return nll.mean() if row_weight is None else (nll * row_weight).sum()


def cross_domain_attention_mass(probs: list[torch.Tensor], domains: torch.Tensor, valid: torch.Tensor,
                                scale: str = "query") -> torch.Tensor:
    """AutoCDSR's L_cd (docs/methods.md "AutoCDSR and AutoCDSR+"): the attention mass that valid queries
    put on valid keys of another domain.

    probs: per layer [B, h, L, L] (after softmax, before dropout, under the model's own mask);
    domains / valid [B, L]. For query i: c_i = sum_j [valid_j and dom_j != dom_i] P_ij.
    ``scale``: ``query`` (the spec): the mean of c_i over valid queries, heads and layers, a mass
    in [0, 1]; ``cell`` (the reference code's): per layer the mean of P_ij [dom_j != dom_i] over
    the (valid query, valid key) cells of the block and the heads, summed over layers, i.e. about
    the per-query mass / the number of keys. Returns a scalar (0 when no valid query exists).
    Differentiable in ``probs``.
    """
    if scale not in ("query", "cell"):
        raise ValueError(f"scale must be query or cell, not {scale!r}")
    cross = ((domains[:, :, None] != domains[:, None, :]) & valid[:, None, :]).unsqueeze(1)  # [B, 1, Lq, Lk]
    q = valid.float()
    # float32 elementwise product + sum (not autocast-lowered), so bf16 probs lose no precision
    total = sum(((p.float() * cross).sum(-1).sum(1) * q).sum() for p in probs)
    if scale == "cell":
        return total / (q.sum(1).square().sum() * probs[0].shape[1]).clamp_min(1)
    return total / (q.sum() * probs[0].shape[1] * len(probs)).clamp_min(1)


def last_state_index(domains: torch.Tensor, valid: torch.Tensor, n_domains: int) -> torch.Tensor:
    """[B, L, D]: index of the last valid position <= i of domain d (-1 if none). Running max."""
    _, L = domains.shape
    pos = torch.arange(L, device=domains.device)
    hit = (domains.unsqueeze(-1) == torch.arange(n_domains, device=domains.device)) & valid.unsqueeze(-1)
    return torch.where(hit, pos[None, :, None], torch.full_like(pos, -1)[None, :, None]).cummax(dim=1).values


def domain_streams(domains: torch.Tensor, valid: torch.Tensor, n_domains: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per domain a: (order [B, L_a] merged positions of a's events in time order, right-aligned;
    valid [B, L_a]). Entries left of a row's a-events are other positions, marked invalid."""
    _, L = domains.shape
    pos = torch.arange(L, device=domains.device)
    out = []
    for a in range(n_domains):
        hit = valid & (domains == a)
        La = max(int(hit.sum(1).max()), 1)
        order = torch.where(hit, pos + L, pos).argsort(dim=1)[:, L - La:]  # distinct keys: hits last, in time order
        out.append((order, hit.gather(1, order)))
    return out


def stream_slots(order: torch.Tensor, valid: torch.Tensor, L: int) -> torch.Tensor:
    """[B, L]: the stream index of each merged position of the stream's domain (-1 elsewhere)."""
    B, La = order.shape
    slot = torch.full((B, L + 1), -1, dtype=torch.long, device=order.device)
    col = torch.arange(La, device=order.device).expand(B, -1)
    return slot.scatter(1, torch.where(valid, order, L), col)[:, :L]


def subsequence_positions(valid: torch.Tensor) -> torch.Tensor:
    """[B, L_a] 0, 1, ... over a right-aligned stream's valid entries, counted from its first
    event (padding: 0)."""
    return (valid.long().cumsum(1) - 1).clamp(min=0)


def last_stream_states(xs: list[torch.Tensor], layout: list[tuple[torch.Tensor, torch.Tensor]],
                       empty: torch.Tensor) -> torch.Tensor:
    """[B, D, d]: :func:`stream_states` at the merged window's end only. A right-aligned stream's
    state there is its last entry; ``empty[a]`` where domain a has no event in the window. xs
    may hold the last entry alone ([B, 1, d], a last-position encoder)."""
    return torch.stack([torch.where(v[:, -1:], x[:, -1], empty[a]) for a, (x, (_, v)) in enumerate(zip(xs, layout))], 1)


def stream_states(xs: list[torch.Tensor], layout: list[tuple[torch.Tensor, torch.Tensor]], domains: torch.Tensor,
                  valid: torch.Tensor, empty: torch.Tensor) -> torch.Tensor:
    """[B, L, D, d]: each domain stream's state at its last event <= merged position i.

    xs: per domain a the encoded stream [B, L_a, d] of ``layout`` (:func:`domain_streams`);
    domains / valid [B, L] of the merged window; ``empty`` [D, d] is used where domain a has no
    event <= i in the window."""
    L, D = domains.shape[1], len(xs)
    slots = torch.stack([stream_slots(o, v, L) for o, v in layout], -1)  # [B, L, D] slot of position i
    at = last_state_index(domains, valid, D)  # [B, L, D] merged index of the last d-event <= i
    sl = slots.gather(1, at.clamp(min=0))  # [B, L, D] its slot in stream d
    d = xs[0].shape[-1]
    S = torch.stack([xs[a].gather(1, sl[..., a].clamp(min=0)[..., None].expand(-1, -1, d)) for a in range(D)], 2)
    return torch.where((at >= 0).unsqueeze(-1), S, empty)


# dot_scores with candidates: score the whole table when it has at most this many items per
# candidate (measured on CPU: the GEMM wins 2-4x up to ~30 items per candidate, loses 2x at ~200)
DENSE_SCORE_RATIO = 32


def dot_scores(q: torch.Tensor, item_emb: torch.Tensor, candidates: torch.Tensor | None,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """The model interface's scores from user vectors q [B, d], the (tied) item table
    [n_items + 1, d] and an optional item bias [n_items + 1] (see ``SeqRecModel.score_parts``):
    [B, n_items + 1] over every item (column 0, padding, is -inf) when ``candidates`` is None,
    else [B, C] for the candidate ids [B, C] (id 0, padding, is -inf)."""
    if candidates is None:
        s = q @ item_emb.T
        if bias is not None:
            s = s + bias
        s[:, 0] = float("-inf")
        return s
    if item_emb.shape[0] <= DENSE_SCORE_RATIO * candidates.shape[1]:
        # many candidates from a small table (sampled-999 on Food-Kitchen): one GEMM over the
        # table and a gather of [B, C] ids beats gathering [B, C, d] embeddings (4x at d 256)
        s = q @ item_emb.T
        if bias is not None:
            s = s + bias
        s = s.gather(1, candidates)
    else:
        s = torch.einsum("bd,bcd->bc", q, item_emb[candidates])
        if bias is not None:
            s = s + bias[candidates]
    return s.masked_fill(candidates == 0, float("-inf"))
