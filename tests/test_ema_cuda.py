"""What is specific to the `cuda` EMA backend (csrc/ema/ema_cuda.cu); the backend-generic tests (forward,
backward, state, truncation, float16/bfloat16, decoding, gradcheck) run it from tests/test_ema_backends.py.
Here: many chunks of the chunked forward scan (long L, truncation windows spanning chunks, odd sizes),
outputs poisoned with NaN beforehand, a bfloat16 shape of realistic size, opcheck and torch.compile on CUDA,
determinism, non-contiguous input, a side stream, and the errors for what the backend does not take.
All marked `gpu` (skipped without CUDA)."""
import pytest
import torch

from helpers import ema_params, random_mask
from mega_kernels import ops
from mega_kernels.reference.ema import ema_coefficients
from test_ema_backends import _check_against_reference, _inputs

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _needs_cuda_backend():
    from mega_kernels.ops.backends import unavailable_reason

    reason = unavailable_reason("ema", "cuda", torch.device("cuda"))
    if reason is not None:
        pytest.fail(f"the cuda backend must run on a GPU machine: {reason}")


@pytest.mark.parametrize("bidirectional,truncation", [(False, None), (True, None), (False, 100), (True, 100)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_many_chunks(bidirectional, truncation, dtype):
    """L = 3000 over D = 130 channels: ~100 chunks of 32 steps, windows of 100 steps reaching across them."""
    with_state = not bidirectional and truncation is None
    x, params, mask, state, gy, gs = _inputs(2, 3000, 130, 16, bidirectional, dtype, "cuda", True, with_state)
    _check_against_reference("cuda", x, params, mask, state, gy, gs, bidirectional=bidirectional,
                             truncation=truncation)


@pytest.mark.parametrize("ndim", [1, 5, 32])
def test_expansion_sizes(ndim):
    x, params, mask, state, gy, gs = _inputs(3, 70, 33, ndim, False, torch.float32, "cuda", True, True)
    _check_against_reference("cuda", x, params, mask, state, gy, gs)


def test_realistic_bf16_shape():
    x, params, mask, _, gy, _ = _inputs(2, 2048, 256, 16, True, torch.bfloat16, "cuda", True, False)
    _check_against_reference("cuda", x, params, mask, None, gy, None, bidirectional=True)


def _poison(shape, count=4):
    """Fill and free a few blocks of this size, so the kernel's fresh outputs likely reuse NaN memory."""
    blocks = [torch.full(shape, float("nan"), device="cuda") for _ in range(count)]
    del blocks


@pytest.mark.parametrize("bidirectional", [False, True])
def test_outputs_written_everywhere(bidirectional):
    x, params, mask, state, gy, gs = _inputs(3, 257, 67, 16, bidirectional, torch.float32, "cuda", True,
                                             not bidirectional)
    leaves = [x.requires_grad_()] + [p.requires_grad_() for p in params]
    _poison(x.shape)
    out = ops.ema(x, *params, mask=mask, bidirectional=bidirectional, state=state,
                  return_state=not bidirectional, backend="cuda")
    y = out[0] if not bidirectional else out
    assert torch.isfinite(y).all()
    if not bidirectional:
        assert torch.isfinite(out[1]).all()
    _poison(x.shape)
    grads = torch.autograd.grad((y * gy).sum(), leaves)
    for g in grads:
        assert torch.isfinite(g).all()


def test_backward_is_deterministic():
    x, params, mask, _, gy, _ = _inputs(4, 1000, 96, 16, True, torch.float32, "cuda", True, False)
    leaves = [x.requires_grad_()] + [p.requires_grad_() for p in params]

    def grads():
        y = ops.ema(x, *params, mask=mask, bidirectional=True, backend="cuda")
        return torch.autograd.grad((y * gy).sum(), leaves)

    for a, b in zip(grads(), grads()):
        assert torch.equal(a, b)


def test_noncontiguous_input_and_side_stream():
    params = [p.float().cuda() for p in ema_params(24, 16)]
    x = torch.randn(50, 2, 24, device="cuda").transpose(0, 1)  # (B, L, D) view, not contiguous
    ref = ops.ema(x.contiguous(), *params, backend="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        y = ops.ema(x, *params, backend="cuda")
    torch.cuda.current_stream().wait_stream(stream)
    torch.testing.assert_close(y, ref, rtol=0, atol=0)


def test_opcheck_on_cuda():
    import mega_kernels.ops.ema_ext  # noqa: F401

    delta, alpha, beta, gamma, omega = (p.float().cuda() for p in ema_params(5, 3))
    a, q, c = (t.requires_grad_() for t in ema_coefficients(delta, alpha, beta, gamma))
    x = torch.randn(2, 40, 5, device="cuda", requires_grad=True)
    omega.requires_grad_()
    mask = random_mask(2, 40).cuda()
    state = torch.randn(2, 5, 3, device="cuda", requires_grad=True)
    torch.library.opcheck(torch.ops.mega_kernels.ema_fwd.default, (x, a, q, c, omega, mask, state, False, 0, True))
    gy, gs = torch.randn_like(x), torch.randn_like(state)
    torch.library.opcheck(torch.ops.mega_kernels.ema_bwd.default,
                          (gy, gs, x.detach(), a.detach(), q.detach(), c.detach(), omega.detach(), mask,
                           state.detach(), False, 0))
    torch.library.opcheck(torch.ops.mega_kernels.ema_step.default,
                          (x[:, 0].detach(), a.detach(), q.detach(), c.detach(), omega.detach(), state.detach(),
                           mask[:, 0]), test_utils=("test_schema", "test_faketensor"))


def test_torch_compile_on_cuda():
    params = [p.float().cuda().requires_grad_() for p in ema_params(16, 8, True)]
    x = torch.randn(2, 33, 16, device="cuda", requires_grad=True)

    def fn(x, *params):
        return ops.ema(x, *params, bidirectional=True, backend="cuda")

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")  # tracing with CUDA fake tensors
    torch.testing.assert_close(compiled(x, *params), fn(x, *params))
    g1 = torch.autograd.grad(compiled(x, *params).sum(), [x] + params)
    g2 = torch.autograd.grad(fn(x, *params).sum(), [x] + params)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("what,match", [("float64", "float64"), ("n33", "N <= 32")])
def test_unsupported_input_is_a_clear_error(what, match):
    ndim = 33 if what == "n33" else 4
    dtype = torch.float64 if what == "float64" else torch.float32
    params = [p.to(dtype).cuda() for p in ema_params(8, ndim, dtype=dtype)]
    x = torch.randn(1, 5, 8, dtype=dtype, device="cuda")
    with pytest.raises(RuntimeError, match=match):
        ops.ema(x, *params, backend="cuda")
