"""The fast paths of the shared layers against their plain PyTorch definitions: the fused
cross-entropies (values and gradients, any chunking), the dropout mask, the last-position
encoder, and the device precision choice."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import cdsr.models.layers as L
from cdsr.models.base import Vocab
from cdsr.models.registry import build_model, model_config

RANGES = ((1, 30), (31, 60), (61, 64))


def _domain_ce_reference(h, tg, td, W, b):
    total = 0
    for d, (lo, hi) in enumerate(RANGES):
        sel = td == d
        logits = h[sel] @ W[lo:hi + 1].T + (0 if b is None else b[lo:hi + 1])
        total = total + F.cross_entropy(logits, tg[sel] - lo, reduction="sum")
    return total / len(tg)


@pytest.mark.parametrize("cells", [1 << 21, 40, 1])
@pytest.mark.parametrize("with_bias", [False, True])
def test_fused_domain_softmax_equals_cross_entropy(monkeypatch, cells, with_bias):
    monkeypatch.setattr(L, "CE_CHUNK_CELLS", cells)  # one chunk, several, one row per chunk
    monkeypatch.setattr(L, "CE_MIN_ROWS", 1)
    torch.manual_seed(0)
    h = torch.randn(53, 8, requires_grad=True)
    W = torch.randn(66, 8, requires_grad=True)
    b = torch.randn(66, requires_grad=True) if with_bias else None
    td = torch.randint(0, 2, (53,))  # domain 2 has no row: skipped
    tg = torch.where(td == 0, torch.randint(1, 31, (53,)), torch.randint(31, 61, (53,)))
    params = [h, W] + ([b] if with_bias else [])
    got = L.domain_softmax_loss(h, tg, td, W, RANGES, b)
    want = _domain_ce_reference(h, tg, td, W, b)
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-6)
    g_got = torch.autograd.grad(got * 2.5, params)  # backward scales the fused gradient
    g_want = torch.autograd.grad(want * 2.5, params)
    for a, e in zip(g_got, g_want):
        assert torch.allclose(a, e, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # no gradient work, same value
        assert torch.allclose(L.domain_softmax_loss(h, tg, td, W, RANGES, b), want, atol=1e-6)


@pytest.mark.parametrize("cells", [1 << 21, 40])
def test_fused_domain_softmax_is_exact_where_the_targets_probability_underflows(monkeypatch, cells):
    """Rows whose target sits hundreds of nats below the best item (p_t below float32's
    smallest normal): the loss is the exact log-softmax's, not a clamped one."""
    monkeypatch.setattr(L, "CE_CHUNK_CELLS", cells)
    monkeypatch.setattr(L, "CE_MIN_ROWS", 1)
    torch.manual_seed(1)
    h = (torch.randn(20, 8) * 40).requires_grad_()
    W = torch.randn(66, 8, requires_grad=True)
    td = torch.randint(0, 2, (20,))
    with torch.no_grad():  # each row's target: its worst item of its domain
        tg = torch.tensor([int((h[i] @ W[lo:hi + 1].T).argmin()) + lo
                           for i, (lo, hi) in enumerate(RANGES[int(d)] for d in td)])
    want = _domain_ce_reference(h, tg, td, W, None)
    assert want.item() > 150  # the underflow regime
    got = L.domain_softmax_loss(h, tg, td, W, RANGES)
    assert torch.allclose(got, want, rtol=1e-6)
    for a, e in zip(torch.autograd.grad(got, [h, W]), torch.autograd.grad(want, [h, W])):
        assert torch.allclose(a, e, rtol=1e-5, atol=1e-5)


def test_fused_domain_softmax_under_bf16_autocast_stays_close():
    torch.manual_seed(1)
    h = torch.randn(200, 16, requires_grad=True)
    W = (0.3 * torch.randn(66, 16)).requires_grad_()
    td = torch.randint(0, 2, (200,))
    tg = torch.where(td == 0, torch.randint(1, 31, (200,)), torch.randint(31, 61, (200,)))
    want = _domain_ce_reference(h, tg, td, W, None)
    gw = torch.autograd.grad(want, [h, W])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = L.domain_softmax_loss(h, tg, td, W, RANGES)
    assert got.dtype == torch.float32 and abs(float(got.detach() - want.detach())) < 0.02 * float(want.detach())
    gg = torch.autograd.grad(got, [h, W])
    for a, e in zip(gg, gw):
        assert gg[0].dtype == torch.float32
        assert float((a - e).norm() / e.norm()) < 0.02


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("cells", [1 << 21, 50])
def test_fused_sampled_softmax_equals_cross_entropy(monkeypatch, normalize, cells):
    monkeypatch.setattr(L, "CE_CHUNK_CELLS", cells)
    torch.manual_seed(2)
    q = torch.randn(37, 8, requires_grad=True)
    T = torch.randn(50, 8, requires_grad=True)
    pos = torch.randint(1, 50, (37,))
    neg = torch.randint(1, 50, (37, 6))
    neg[0, :3] = pos[0]  # negatives equal to the positive are masked
    f = (lambda e: F.normalize(e, dim=-1)) if normalize else (lambda e: e)
    logits = torch.cat([(q * f(T[pos])).sum(-1, keepdim=True),
                        torch.bmm(f(T[neg]), q[:, :, None])[:, :, 0].masked_fill(neg == pos[:, None], float("-inf"))], 1)
    want = F.cross_entropy(logits * 3.0, torch.zeros(37, dtype=torch.long))
    got = L.sampled_softmax_loss(q, T, pos, neg, 3.0, normalize=normalize)
    assert torch.allclose(got, want, atol=1e-5)
    for a, e in zip(torch.autograd.grad(got, [q, T]), torch.autograd.grad(want, [q, T])):
        assert torch.allclose(a, e, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("cells", [1 << 21, 50])
def test_row_weighted_losses_equal_weighted_cross_entropy(monkeypatch, cells):
    monkeypatch.setattr(L, "CE_CHUNK_CELLS", cells)
    monkeypatch.setattr(L, "CE_MIN_ROWS", 1)
    torch.manual_seed(5)
    q = torch.randn(41, 8, requires_grad=True)
    T = torch.randn(66, 8, requires_grad=True)
    td = torch.randint(0, 2, (41,))
    tg = torch.where(td == 0, torch.randint(1, 31, (41,)), torch.randint(31, 61, (41,)))
    w = torch.rand(41)
    neg = torch.randint(1, 61, (41, 7))
    logits = torch.cat([(q * T[tg]).sum(-1, keepdim=True),
                        torch.bmm(T[neg], q[:, :, None])[:, :, 0].masked_fill(neg == tg[:, None], float("-inf"))], 1)
    cases = [(L.sampled_softmax_loss(q, T, tg, neg, 2.0, row_weight=w),
              (F.cross_entropy(logits * 2.0, torch.zeros(41, dtype=torch.long), reduction="none") * w).sum())]
    per_row = torch.zeros(41)
    for d, (lo, hi) in enumerate(RANGES[:2]):
        sel = td == d
        per_row = per_row.masked_scatter(sel, F.cross_entropy(q[sel] @ T[lo:hi + 1].T, tg[sel] - lo, reduction="none"))
    cases.append((L.domain_softmax_loss(q, tg, td, T, RANGES, row_weight=w), (per_row * w).sum()))
    for got, want in cases:
        assert torch.allclose(got, want, atol=1e-5)
        for a, e in zip(torch.autograd.grad(got, [q, T]), torch.autograd.grad(want, [q, T])):
            assert torch.allclose(a, e, rtol=1e-4, atol=1e-6)


def test_loss_weights_give_abxis_per_user_per_domain_average():
    # ABXI's code: loss_t = mean over the batch rows of (mean of the row's domain-t losses, 0 if
    # none), summed over domains; here 3 rows, row 2 without any domain-1 target
    rows = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])
    dom = torch.tensor([0, 1, 1, 0, 1, 0, 0, 0])
    loss = torch.tensor([1.0, 2.0, 4.0, 3.0, 5.0, 6.0, 9.0, 3.0])
    w = L.loss_weights(rows, dom, 3, 2)
    want = (1.0 + 3.0 + (6 + 9 + 3) / 3) / 3 + ((2 + 4) / 2 + 5.0 + 0.0) / 3
    assert torch.isclose((w * loss).sum(), torch.tensor(want))


def test_dropout_mask_is_seeded_unbiased_and_its_own_gradient():
    x = torch.ones(400, 500, requires_grad=True)
    torch.manual_seed(3)
    y = L.dropout(x, 0.2, True)
    torch.manual_seed(3)
    assert torch.equal(L.dropout(x, 0.2, True), y)  # the global generator fixes the mask
    kept = y != 0
    assert abs(float(kept.float().mean()) - 0.8) < 0.01
    assert torch.allclose(y[kept], torch.full_like(y[kept], 1.25))  # inverted: scaled by 1 / (1 - p)
    (g,) = torch.autograd.grad(y.sum(), x)
    assert torch.equal(g, y.detach())  # the gradient passes where the input passed, scaled alike
    assert L.dropout(x, 0.2, False) is x and L.dropout(x, 0.0, True) is x
    m = L.Dropout(0.3).eval()
    assert m(x) is x and "p=0.3" in repr(m)


@pytest.mark.parametrize("name", ["sasrec", "bert4rec", "autocdsr_sasrec", "autocdsr_plus"])
def test_last_position_encoder_equals_the_full_one(name):
    vocab = Vocab.from_ranges(torch.tensor([[1, 30], [31, 64]]).numpy(), ["a", "b"])
    torch.manual_seed(4)
    net = build_model(name, model_config(name, {"d": 16, "layers": 2, "heads": 2, "max_len": 12}, "merged"), vocab).eval()
    items = torch.randint(1, 65, (5, 12))
    items[1, :7] = 0
    batch = {"items": items, "domains": (items > 30).long(), "mask": items > 0,
             "timestamps": torch.arange(12).expand(5, -1), "target_domain": torch.tensor([0, 1, 0, 1, 1])}
    with torch.no_grad():
        q, table, bias = net.score_parts(batch)
        full = net.score(batch, None)
        if name in ("sasrec", "autocdsr_sasrec"):
            h, _ = net.encode(batch)
        else:  # the masked-item models: the history and the [MASK] slot, every position encoded
            h, _ = net.encode(*net.inference_inputs(batch))
        assert torch.allclose(q, h[:, -1], atol=1e-5)
    ref = q @ table.T + (0 if bias is None else bias)
    assert torch.allclose(full[:, 1:], ref[:, 1:], atol=1e-5) and torch.isinf(full[:, 0]).all()


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("with_sink", [False, True])
def test_last_query_attention_equals_the_general_path(causal, with_sink):
    """The evaluation path (keys and values folded into the query) gives the last position of the
    general path: padding, a padded last row's own diagonal, a sink of n zero vectors (n = 0:
    none), and its inputs' padding rows left as they are (not zeroed)."""
    torch.manual_seed(0)
    mha = L.MultiHeadAttention(12, 3, 0.3).eval()
    torch.nn.init.normal_(mha.qkv.bias, std=0.5)  # sink keys and values are the biases
    x = torch.randn(4, 6, 12)
    valid = torch.ones(4, 6, dtype=torch.bool)
    valid[1, :4] = False
    valid[2, :] = False  # nothing valid: the diagonal alone
    valid[3, 2] = False
    sink = torch.tensor([[0] * 6, [4] * 6, [6] * 6, [1] * 6]) if with_sink else None
    mask = L.attention_mask(valid, causal=causal)
    with torch.no_grad():
        fast, _ = mha(x, mask, last_only=True, sink=sink)
        full, _ = mha(x, mask, sink=sink)
        probs = mha(x, mask, need_probs=True, last_only=True, sink=sink)[1]  # the general path
    assert fast.shape == (4, 1, 12) and probs is not None
    assert torch.allclose(fast[:, 0], full[:, -1], atol=1e-5)
    mha.train()  # dropout on: the general path, never the folded one
    mha._last_query = lambda *a: pytest.fail("the folded path ran with dropout on")
    assert mha(x, mask, last_only=True, sink=sink)[0].shape == (4, 1, 12)


@pytest.mark.parametrize("causal", [True, False])
def test_evaluation_encoder_on_valid_rows_gives_the_padded_numbers(causal):
    """In evaluation the blocks compute the valid rows alone (padding rows come out zero): the
    valid rows, the probabilities of valid queries and the last position are the padded path's."""
    torch.manual_seed(0)
    enc = L.Encoder(12, 2, 3, 0.0)
    x = torch.randn(4, 6, 12)
    valid = torch.ones(4, 6, dtype=torch.bool)
    valid[1, :4] = False
    valid[3, 2] = False
    mask = L.attention_mask(valid, causal=causal)
    with torch.no_grad():
        want, want_p = enc.train()(x, mask, need_probs=True)  # dropout 0: the padded path's numbers
        got, got_p = enc.eval()(x, mask, need_probs=True, valid=valid)
        last, _ = enc(x, mask, last_only=True, valid=valid)
    assert torch.allclose(got[valid], want[valid], atol=1e-5)
    assert torch.allclose(got_p[1][valid[:, None, :, None].expand_as(got_p[1]) & mask.expand_as(got_p[1])],
                          want_p[1][valid[:, None, :, None].expand_as(want_p[1]) & mask.expand_as(want_p[1])], atol=1e-5)
    assert torch.allclose(last[:, 0], want[:, -1], atol=1e-5)


def test_amp_dtype_follows_the_device():
    from cdsr.train.config import amp_dtype

    cpu = amp_dtype(torch.device("cpu"))
    assert cpu == (torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else None)
    assert amp_dtype(torch.device("meta")) is None


@pytest.mark.parametrize("weighted", [False, True])
def test_shared_negatives_loss_is_the_sampled_loss_with_each_rows_negatives(weighted):
    """Negatives shared per sequence = the per-position sampled softmax given each position its
    row's negatives: the same loss and gradients (a negative equal to the positive masked)."""
    from cdsr.models.layers import sampled_softmax_loss, shared_negatives_softmax_loss

    g = torch.Generator().manual_seed(0)
    B, V, d, R = 5, 40, 8, 12
    rows = torch.tensor([0, 0, 0, 1, 3, 3, 4, 4, 4, 4])  # row 2 has no position
    table = torch.randn(V, d, generator=g, requires_grad=True)
    q = torch.randn(len(rows), d, generator=g, requires_grad=True)
    pos = torch.randint(1, V, (len(rows),), generator=g)
    neg = torch.randint(1, V, (B, R), generator=g)
    neg[0, 3] = pos[1]  # a negative equal to a positive of its row: masked
    w = torch.rand(len(rows), generator=g) if weighted else None
    a = shared_negatives_softmax_loss(q, rows, table, pos, neg, 1.3, row_weight=w)
    ga = torch.autograd.grad(a, (q, table))
    b = sampled_softmax_loss(q, table, pos, neg[rows], 1.3, row_weight=w)
    gb = torch.autograd.grad(b, (q, table))
    assert torch.allclose(a, b, atol=1e-5)
    for x, y in zip(ga, gb):
        assert torch.allclose(x, y, atol=1e-5)
