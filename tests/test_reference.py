"""The reference ops against independent, slower statements of the maths (float64).

The EMA's two reference forms (FFT and recurrence) must agree; the attention reference must agree with a
per-query loop that applies the spec's rules one key at a time. Gradients of the FFT form are checked too.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from helpers import ema_params, random_mask
from mega_kernels.reference.attention import (ACTIVATIONS, attention, attention_and_weights, attention_weights, laplace,
                                              relu2)
from mega_kernels.reference.ema import ema_coefficients, ema_fft, ema_kernel, ema_recurrent, ema_step


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("truncation", [None, 1, 4, 40])
@pytest.mark.parametrize("bsz,length,dim,ndim", [(2, 1, 3, 1), (3, 17, 5, 3), (1, 33, 2, 4)])
def test_ema_fft_equals_recurrence(bidirectional, truncation, bsz, length, dim, ndim):
    x = torch.randn(bsz, length, dim, dtype=torch.float64)
    delta, alpha, beta, gamma, omega = ema_params(dim, ndim, bidirectional)
    a, q, c = ema_coefficients(delta, alpha, beta, gamma)
    mask = random_mask(bsz, length)
    kw = dict(mask=mask, bidirectional=bidirectional, truncation=truncation)
    torch.testing.assert_close(ema_fft(x, a, q, c, omega, **kw), ema_recurrent(x, a, q, c, omega, **kw),
                               rtol=1e-12, atol=1e-12)


def test_ema_kernel_matches_definition():
    delta, alpha, beta, gamma, _ = ema_params(3, 4)
    a, q, c = ema_coefficients(delta, alpha, beta, gamma)
    k = ema_kernel(a, q, c, 6)
    p = torch.sigmoid(delta[..., 0])
    qq = 1 - p * torch.sigmoid(alpha[..., 0])
    want = torch.stack([(gamma * math.sqrt(1 / 4) * p * beta[..., 0] * qq**l).sum(-1) for l in range(6)], -1)
    torch.testing.assert_close(k, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_ema_fft_of_a_saturated_damping_is_finite(bidirectional):
    """delta = alpha = 20: p and sigmoid(alpha) round to 1 in float32, so q = 0 for every channel. The powers
    q^l are 1 at l = 0 and 0 after: the FFT form (exp(l log q), NaN at 0 * log 0 unguarded) equals the
    recurrence, forward and state, and its gradients are finite."""
    delta, alpha, beta, gamma, omega = (p.float() for p in ema_params(3, 2, bidirectional))
    delta, alpha = torch.full_like(delta, 20.0), torch.full_like(alpha, 20.0)
    leaves = [t.requires_grad_() for t in (delta, alpha, beta, gamma, omega)]
    a, q, c = ema_coefficients(delta, alpha, beta, gamma)
    assert (q == 0).all()
    x = torch.randn(2, 7, 3, requires_grad=True)
    kw = dict(mask=random_mask(2, 7), bidirectional=bidirectional)
    if not bidirectional:
        kw.update(state=torch.randn(2, 3, 2), return_state=True)
    got, want = ema_fft(x, a, q, c, omega, **kw), ema_recurrent(x, a, q, c, omega, **kw)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    grads = torch.autograd.grad(sum(t.sum() for t in (got if isinstance(got, tuple) else (got,))), [x] + leaves)
    for name, g in zip(("x", "delta", "alpha", "beta", "gamma", "omega"), grads):
        assert torch.isfinite(g).all(), name


def test_ema_state_split_and_steps_equal_one_pass():
    x = torch.randn(2, 20, 5, dtype=torch.float64)
    delta, alpha, beta, gamma, omega = ema_params(5, 3)
    a, q, c = ema_coefficients(delta, alpha, beta, gamma)
    mask = random_mask(2, 20)
    y, s = ema_fft(x, a, q, c, omega, mask=mask, return_state=True)
    ya, sa = ema_fft(x[:, :8], a, q, c, omega, mask=mask[:, :8], return_state=True)
    yb, sb = ema_fft(x[:, 8:], a, q, c, omega, mask=mask[:, 8:], state=sa, return_state=True)
    torch.testing.assert_close(torch.cat([ya, yb], 1), y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sb, s, rtol=1e-12, atol=1e-12)
    yr, sr = ema_recurrent(x[:, 8:], a, q, c, omega, mask=mask[:, 8:], state=sa, return_state=True)
    torch.testing.assert_close(yr, yb, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sr, sb, rtol=1e-12, atol=1e-12)
    state = torch.zeros(2, 5, 3, dtype=torch.float64)
    for t in range(20):
        yt, state = ema_step(x[:, t], a, q, c, omega, state, mask=mask[:, t])
        torch.testing.assert_close(yt, y[:, t], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state, s, rtol=1e-12, atol=1e-12)


def test_ema_state_rejected_where_undefined():
    x = torch.randn(1, 4, 2, dtype=torch.float64)
    delta, alpha, beta, gamma, omega = ema_params(2, 2, bidirectional=True)
    a, q, c = ema_coefficients(delta, alpha, beta, gamma)
    with pytest.raises(ValueError, match="unidirectional"):
        ema_fft(x, a, q, c, omega, bidirectional=True, return_state=True)
    with pytest.raises(ValueError, match="truncat"):
        ema_fft(x, a[:2], q[:2], c[:2], omega, truncation=2, return_state=True)


def test_ema_fft_gradcheck():
    x = torch.randn(2, 6, 3, dtype=torch.float64, requires_grad=True)
    params = ema_params(3, 2, bidirectional=True, requires_grad=True)
    mask = random_mask(2, 6)

    def f(x, delta, alpha, beta, gamma, omega):
        a, q, c = ema_coefficients(delta, alpha, beta, gamma)
        return ema_fft(x, a, q, c, omega, mask=mask, bidirectional=True, truncation=4)

    assert torch.autograd.gradcheck(f, (x, *params))


# -- attention -----------------------------------------------------------------------------------------

def _loop_attention(q, k, v, rel_bias, activation, chunk, causal, kpm):
    """Spec 5.7-5.9 one query and one key at a time (absolute positions, queries at the end of the keys)."""
    bsz, lq, zdim = q.shape
    lk = k.shape[1]
    width = (rel_bias.shape[0] + 1) // 2
    out = torch.zeros(bsz, lq, v.shape[2], dtype=v.dtype)
    act = {"laplace": laplace, "relu2": relu2}.get(activation)
    for b in range(bsz):
        for i in range(lq):
            pos = lk - lq + i
            block = [j for j in range(lk) if (j // chunk if chunk else 0) == (pos // chunk if chunk else 0)]
            keep = [j for j in block if kpm is None or kpm[b, j]]
            seen = [j for j in block if not causal or j <= pos]
            if activation == "softmax":
                vis = [j for j in seen if j in keep] if keep else seen  # an all-padding block ignores padding
                if not vis:
                    continue
                s = torch.stack([q[b, i] @ k[b, j] * zdim**-0.5 + rel_bias[width - 1 + j - pos] for j in vis])
                p = torch.softmax(s, 0)
                out[b, i] = sum(p[t] * v[b, j] for t, j in enumerate(vis))
            else:
                n = pos - block[0] + 1 if causal else max(len(keep), 1)
                for j in seen:
                    if j in keep:
                        out[b, i] += act(q[b, i] @ k[b, j] / n + rel_bias[width - 1 + j - pos]) * v[b, j]
    return out


@pytest.mark.parametrize("activation", ["softmax", "laplace", "relu2"])
@pytest.mark.parametrize("chunk", [None, 4])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lq", [9, 4, 1])
def test_attention_equals_loop(activation, chunk, causal, lq):
    bsz, lk, zdim, edim = 2, 9, 3, 5
    q = torch.randn(bsz, lq, zdim, dtype=torch.float64)
    k = torch.randn(bsz, lk, zdim, dtype=torch.float64)
    v = torch.randn(bsz, lk, edim, dtype=torch.float64)
    kpm = torch.ones(bsz, lk, dtype=torch.bool)
    kpm[0, :5] = False  # left padding, a whole first chunk of padding when chunked
    kpm[1, 7:] = False  # right padding
    for mask, extra in ((None, 0), (kpm, 0), (kpm, 3)):  # extra: a bias longer than the block, used from its centre
        rel_bias = torch.randn(2 * ((chunk or lk) + extra) - 1, dtype=torch.float64)
        got = attention(q, k, v, rel_bias, activation=activation, chunk_size=chunk, causal=causal,
                        key_padding_mask=mask)
        want = _loop_attention(q, k, v, rel_bias, activation, chunk, causal, mask)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
        assert torch.isfinite(got).all()


def test_attention_weights_reproduce_output():
    q, k, v = (torch.randn(2, 10, d, dtype=torch.float64) for d in (4, 4, 6))
    rel_bias = torch.randn(7, dtype=torch.float64)
    for act in ("softmax", "laplace", "relu2"):
        w = attention_weights(q, k, v, rel_bias, activation=act, chunk_size=4, causal=True)
        out = attention(q, k, v, rel_bias, activation=act, chunk_size=4, causal=True)
        torch.testing.assert_close(w @ v, out, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bsz,lq,lk", [(0, 10, 10), (2, 0, 0)])
def test_attention_of_an_empty_batch_or_no_key(bsz, lq, lk):
    """B = 0, or no key at all (Lk = 0, so Lq = 0): empty output and weights (the model's output_attentions
    calls attention_weights whatever B)."""
    q, k, v = (torch.randn(bsz, n, d, dtype=torch.float64) for n, d in ((lq, 4), (lk, 4), (lk, 6)))
    for act in ("softmax", "laplace"):
        kw = dict(activation=act, chunk_size=4, causal=True, key_padding_mask=torch.ones(bsz, lk, dtype=torch.bool))
        assert attention(q, k, v, torch.randn(7, dtype=torch.float64), **kw).shape == (bsz, lq, 6)
        assert attention_weights(q, k, v, torch.randn(7, dtype=torch.float64), **kw).shape == (bsz, lq, lk)


@pytest.mark.parametrize("lq", [10, 3])
def test_attention_and_weights_is_one_pass_of_both(lq):
    """Output and weights from one pass equal the two functions; a dropout callable acts on the blocked
    probabilities before their product with v, as dropping the dense weights would (the weights returned are
    those before dropout)."""
    q, k, v = (torch.randn(2, n, d, dtype=torch.float64) for n, d in ((lq, 4), (10, 4), (10, 6)))
    rel_bias = torch.randn(7, dtype=torch.float64)
    kw = dict(activation="softmax", chunk_size=4, causal=True, key_padding_mask=random_mask(2, 10))
    out, w = attention_and_weights(q, k, v, rel_bias, **kw)
    assert torch.equal(out, attention(q, k, v, rel_bias, **kw))
    assert torch.equal(w, attention_weights(q, k, v, rel_bias, **kw))
    scale = {}

    def drop(p):  # deterministic stand-in for dropout, remembered per block to rebuild the dense mask
        scale["blocks"] = torch.rand(p.shape, dtype=p.dtype).round() * 2
        return p * scale["blocks"]

    dropped, w2 = attention_and_weights(q, k, v, rel_bias, dropout=drop, **kw)
    assert torch.equal(w2, w)
    if lq == 10:  # the three blocks of all ten queries
        blocks = scale["blocks"].reshape(2, 3, 4, 4)
        dense_mask = torch.stack([torch.block_diag(*blocks[0]), torch.block_diag(*blocks[1])])[:, :10, :10]
        torch.testing.assert_close(dropped, (w * dense_mask) @ v, rtol=1e-12, atol=1e-12)
        assert not torch.allclose(dropped, out)
    halved, _ = attention_and_weights(q, k, v, rel_bias, dropout=lambda p: p * 0.5, **kw)
    torch.testing.assert_close(halved, out * 0.5, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("length,chunk", [(10, 4), (12, 4), (10, None), (3, 8), (1, 4)])
def test_blocked_weights_are_the_dense_diagonal_blocks(length, chunk):
    """blocked=True gives the diagonal blocks (B, blocks, S, S) of the dense weights, zero past the sequence end
    (the last block's padding), for every activation; the output is unchanged."""
    q, k, v = (torch.randn(2, length, d, dtype=torch.float64) for d in (4, 4, 6))
    rel_bias = torch.randn(23, dtype=torch.float64)
    for act in ACTIVATIONS:
        for causal in (False, True):
            kw = dict(activation=act, chunk_size=chunk, causal=causal, key_padding_mask=random_mask(2, length))
            out, dense = attention_and_weights(q, k, v, rel_bias, **kw)
            out_b, blocks = attention_and_weights(q, k, v, rel_bias, blocked=True, **kw)
            size = chunk if chunk and chunk < length else length
            n = -(-length // size)
            padded = F.pad(dense, (0, n * size - length, 0, n * size - length)).view(2, n, size, n, size)
            assert blocks.shape == (2, n, size, size)
            assert torch.equal(blocks, torch.stack([padded[:, i, :, i] for i in range(n)], 1))
            assert torch.equal(out_b, out)


def test_attention_rejects_a_bias_shorter_than_the_block():
    """The Toeplitz bias is cut from the middle 2S - 1 taps: a shorter vector must not wrap around."""
    q, k, v = (torch.randn(1, 6, 3, dtype=torch.float64) for _ in range(3))
    with pytest.raises(ValueError, match="rel_bias covers blocks of 2 positions but the block length is 3"):
        attention(q, k, v, torch.randn(3, dtype=torch.float64), chunk_size=3)


def test_attention_gradcheck():
    q, k, v = (torch.randn(1, 6, d, dtype=torch.float64, requires_grad=True) for d in (3, 3, 2))
    kpm = torch.tensor([[False, True, True, True, True, False]])
    for taps in (5, 9):  # 9: a bias longer than the block, whose outer taps get zero gradient
        rel_bias = torch.randn(taps, dtype=torch.float64, requires_grad=True)
        for act in ("softmax", "laplace", "relu2"):
            assert torch.autograd.gradcheck(
                lambda *t: attention(*t, activation=act, chunk_size=3, causal=True, key_padding_mask=kpm),
                (q, k, v, rel_bias))
        attention(q, k, v, rel_bias, chunk_size=3).sum().backward()
        outer = rel_bias.grad[:(taps - 5) // 2].abs().sum() + rel_bias.grad[taps - (taps - 5) // 2:].abs().sum()
        assert outer == 0 and rel_bias.grad.abs().sum() > 0
    tail = q[:, -2:].detach().requires_grad_()  # queries at the end of the keys, in one block: the query rows only
    rel_bias = torch.randn(11, dtype=torch.float64, requires_grad=True)
    for chunk in (None, 4):
        for act in ("softmax", "laplace"):
            assert torch.autograd.gradcheck(
                lambda *t: attention(*t, activation=act, chunk_size=chunk, causal=True, key_padding_mask=kpm),
                (tail, k, v, rel_bias))
