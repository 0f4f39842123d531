"""bfloat16 inside Triton kernels does what a GPU does: float32 -> bfloat16 rounds to nearest even, and `tl.dot`
of bfloat16 tiles equals the float32 product of the same values. On the CPU this checks the interpreter patch in
mega_kernels/triton/__init__.py (Triton 3.6's interpreter truncates the cast and multiplies the bit patterns in
the dot); on a GPU the same tests check the compiled kernels."""
import pytest
import torch
import triton
import triton.language as tl

import mega_kernels.triton  # noqa: F401  (applies the interpreter patch, as every kernel import does)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@triton.jit
def _cast_kernel(src, dst, N: tl.constexpr):
    i = tl.arange(0, N)
    tl.store(dst + i, tl.load(src + i).to(tl.bfloat16))


@triton.jit
def _dot_kernel(a_ptr, b_ptr, c_ptr, M: tl.constexpr, K: tl.constexpr, N: tl.constexpr):
    m, k, n = tl.arange(0, M), tl.arange(0, K), tl.arange(0, N)
    a = tl.load(a_ptr + m[:, None] * K + k[None, :])
    b = tl.load(b_ptr + k[:, None] * N + n[None, :])
    tl.store(c_ptr + m[:, None] * N + n[None, :], tl.dot(a, b))


def test_float32_to_bfloat16_rounds_to_nearest_even():
    """Bit for bit as torch (round to nearest, ties to even) on random bit patterns (normal, subnormal, huge)
    and the edge values: exact ties both ways, the largest float32 (rounds to inf), infinities, signed zeros;
    a NaN stays a NaN."""
    gen = torch.Generator().manual_seed(0)
    bits = torch.randint(-2 ** 31, 2 ** 31 - 1, (4096,), generator=gen, dtype=torch.int64).to(torch.int32)
    edges = torch.tensor([1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, -(1.0 + 2 ** -8), 3.4028235e38, 1e-45, 0.0, -0.0,
                          float("inf"), -float("inf"), float("nan")])
    x = torch.cat([bits.view(torch.float32), edges])
    x = torch.cat([x, torch.zeros(triton.next_power_of_2(x.numel()) - x.numel())]).to(DEVICE)
    out = torch.empty(x.shape, dtype=torch.bfloat16, device=DEVICE)
    _cast_kernel[(1,)](x, out, x.numel())
    want = x.to(torch.bfloat16)
    nan = want.isnan()
    assert torch.equal(out.isnan(), nan)
    assert torch.equal(out[~nan].view(torch.int16), want[~nan].view(torch.int16))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_16bit_dot_is_the_float32_product(dtype):
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(16, 32, generator=gen).to(dtype)
    b = torch.randn(32, 16, generator=gen).to(dtype)
    c = torch.empty(16, 16, device=DEVICE)
    _dot_kernel[(1,)](a.to(DEVICE), b.to(DEVICE), c, 16, 32, 16)
    # products of 16-bit values are exact in float32; only the order of the float32 sums may differ
    torch.testing.assert_close(c.cpu(), a.float() @ b.float(), rtol=1e-6, atol=1e-5)
