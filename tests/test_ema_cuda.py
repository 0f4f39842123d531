"""What is specific to the `cuda` EMA backend (csrc/ema/ema_cuda.cu); the backend-generic tests (forward,
backward, state, truncation, float16/bfloat16, decoding, gradcheck) run it from tests/test_ema_backends.py.

Without a GPU: the kernels' thread functions (csrc/ema/ema_cuda_threads.cuh) run on the CPU through
csrc/testing/ema_cuda_emulator.cpp, in launch order, against the float64 reference (chunking, the prefix pass,
truncation windows across chunks, states, padded N, blocked gradient sums, NaN-filled outputs).
On a GPU (marked `gpu`): many chunks of the chunked forward scan, outputs poisoned with NaN beforehand, a
bfloat16 shape of realistic size, opcheck and torch.compile on CUDA, determinism, non-contiguous input, a side
stream, and the errors for what the backend does not take.
"""
import hashlib
import os

import pytest
import torch

from helpers import assert_close_to_reference, ema_params, random_mask
from mega_kernels import _build, _ext, ops
from mega_kernels.reference.ema import ema_coefficients, ema_fft
from mega_kernels.reference.ema import ema_step as ref_step
from test_ema_backends import _check_against_reference, _inputs

_EMULATOR_FILES = ["csrc/testing/ema_cuda_emulator.cpp", "csrc/ema/ema_cuda_threads.cuh",
                   "csrc/ema/ema_kernels.cuh", "csrc/ema/ema_cuda.h"]


@pytest.fixture(autouse=True)
def _needs_cuda_backend(request):
    if request.node.get_closest_marker("gpu") is None:
        return
    from mega_kernels.ops.backends import unavailable_reason

    reason = unavailable_reason("ema", "cuda", torch.device("cuda"))
    if reason is not None:
        pytest.fail(f"the cuda backend must run on a GPU machine: {reason}")


@pytest.fixture(scope="module")
def emulator():
    """The CUDA thread functions compiled for the CPU (built once per source hash into the extension cache)."""
    from torch.utils import cpp_extension

    flags = ["-O2", "-DMK_TIME_UNROLL=8"]  # the GPU's software pipelining of the forward sweeps, on the CPU
    digest = hashlib.sha256((torch.__version__ + str(flags)).encode())
    for rel in _EMULATOR_FILES:
        digest.update((_build.ROOT / rel).read_bytes())
    tag = digest.hexdigest()[:16]
    build_dir = _ext.cache_root() / f"emulator-{tag}"
    build_dir.mkdir(parents=True, exist_ok=True)
    try:
        return cpp_extension.load(name=f"mega_kernels_cuda_emulator_{tag}", build_directory=str(build_dir),
                                  sources=[str(_build.ROOT / _EMULATOR_FILES[0])], extra_cflags=flags)
    except Exception as exc:
        if os.environ.get("CI") == "true":
            raise
        pytest.skip(f"cannot build the CUDA emulator here: {exc}")


def _coefs(a, q, c, truncation):
    """The six (kd, N) float32 coefficient tensors the kernels read (as csrc/ema/ema_checks.h makes them)."""
    f = lambda t: t.detach().float().contiguous()  # noqa: E731
    if not truncation:
        zero = torch.zeros(a.shape)
        return [f(a), f(q), f(c), zero, zero, zero]
    qk1 = q.detach() ** (truncation - 1)
    return [f(a), f(q), f(c), f(a * qk1 * q), f(qk1 * q), f(a * qk1 * truncation)]


EMULATOR_CASES = {  # (B, L, D, N, bidirectional, truncation, with_state)
    "chunks_state": (2, 300, 130, 16, False, 0, True),
    "chunks_bi": (2, 300, 130, 16, True, 0, False),
    "window_across_chunks": (3, 257, 20, 5, False, 40, False),
    "window_across_chunks_bi": (3, 257, 20, 5, True, 40, False),
    "one_step_bi": (1, 1, 7, 3, True, 0, False),
    "n32_state": (2, 100, 5, 32, False, 0, True),
    "n1_bi_window": (1, 50, 3, 1, True, 7, False),
}


@pytest.mark.parametrize("case", EMULATOR_CASES)
def test_cuda_kernel_logic_on_cpu(emulator, case):
    bsz, length, dim, ndim, bidirectional, truncation, with_state = EMULATOR_CASES[case]
    delta, alpha, beta, gamma, omega = ema_params(dim, ndim, bidirectional)
    a, q, c = ema_coefficients(delta, alpha, beta, gamma)
    x = torch.randn(bsz, length, dim, dtype=torch.float64)
    mask = random_mask(bsz, length)
    state = torch.randn(bsz, dim, ndim, dtype=torch.float64) if with_state else None
    gy = torch.randn(bsz, length, dim, dtype=torch.float64)
    gs = torch.randn(bsz, dim, ndim, dtype=torch.float64) if with_state else None

    def reference(dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (x, a, q, c, omega)]
        if with_state:
            leaves.append(state.to(dtype).requires_grad_())
        out = ema_fft(*leaves[:5], mask=mask, bidirectional=bidirectional, truncation=truncation or None,
                      state=leaves[5] if with_state else None, return_state=with_state)
        y, final = out if with_state else (out, None)
        loss = (y.double() * gy).sum() + ((final.double() * gs).sum() if with_state else 0)
        return [y.detach()] + ([final.detach()] if with_state else []) + list(torch.autograd.grad(loss, leaves))

    ref64, ref32 = reference(torch.float64), reference(torch.float32)
    co = _coefs(a, q, c, truncation)
    f = lambda t: None if t is None else t.float().contiguous()  # noqa: E731
    y, final, plan = emulator.fwd(f(x), co, f(omega), mask, f(state), bidirectional, truncation, with_state)
    grads = emulator.bwd(f(gy), f(gs), f(x), co, f(omega), mask, f(state), bidirectional, truncation)
    if case.startswith("chunks") or case.startswith("window"):
        assert plan[1] > 1, "the case must span several chunks"
    got = [y] + ([final] if with_state else []) + list(grads[:5]) + ([grads[5]] if with_state else [])
    names = ["y"] + (["final_state"] if with_state else []) + ["dx", "da", "dq", "dc", "domega"] + \
        (["dstate"] if with_state else [])
    for name, o, r64, r32 in zip(names, got, ref64, ref32):
        assert_close_to_reference(f"{case} {name}", o, r64, r32)


def test_cuda_step_logic_on_cpu(emulator):
    delta, alpha, beta, gamma, omega = ema_params(9, 16)
    a, q, c = ema_coefficients(delta, alpha, beta, gamma)
    x = torch.randn(3, 9, dtype=torch.float64)
    state = torch.randn(3, 9, 16, dtype=torch.float64)
    mask = torch.tensor([True, False, True])
    ref = ref_step(x, a, q, c, omega, state, mask)
    low = ref_step(x.float(), a.float(), q.float(), c.float(), omega.float(), state.float(), mask)
    got = emulator.step(x.float(), _coefs(a, q, c, 0), omega.float(), state.float(), mask)
    for name, o, r64, r32 in zip(("y", "state"), got, ref, low):
        assert_close_to_reference(name, o, r64, r32)


@pytest.mark.gpu
@pytest.mark.parametrize("bidirectional,truncation", [(False, None), (True, None), (False, 100), (True, 100)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_many_chunks(bidirectional, truncation, dtype):
    """L = 3000 over D = 130 channels: ~100 chunks of 32 steps, windows of 100 steps reaching across them."""
    with_state = not bidirectional and truncation is None
    x, params, mask, state, gy, gs = _inputs(2, 3000, 130, 16, bidirectional, dtype, "cuda", True, with_state)
    _check_against_reference("cuda", x, params, mask, state, gy, gs, bidirectional=bidirectional,
                             truncation=truncation)


@pytest.mark.gpu
@pytest.mark.parametrize("ndim", [1, 5, 32])
def test_expansion_sizes(ndim):
    x, params, mask, state, gy, gs = _inputs(3, 70, 33, ndim, False, torch.float32, "cuda", True, True)
    _check_against_reference("cuda", x, params, mask, state, gy, gs)


@pytest.mark.gpu
def test_realistic_bf16_shape():
    x, params, mask, _, gy, _ = _inputs(2, 2048, 256, 16, True, torch.bfloat16, "cuda", True, False)
    _check_against_reference("cuda", x, params, mask, None, gy, None, bidirectional=True)


def _poison(shape, count=4):
    """Fill and free a few blocks of this size, so the kernel's fresh outputs likely reuse NaN memory."""
    blocks = [torch.full(shape, float("nan"), device="cuda") for _ in range(count)]
    del blocks


@pytest.mark.gpu
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


@pytest.mark.gpu
def test_backward_is_deterministic():
    x, params, mask, _, gy, _ = _inputs(4, 1000, 96, 16, True, torch.float32, "cuda", True, False)
    leaves = [x.requires_grad_()] + [p.requires_grad_() for p in params]

    def grads():
        y = ops.ema(x, *params, mask=mask, bidirectional=True, backend="cuda")
        return torch.autograd.grad((y * gy).sum(), leaves)

    for a, b in zip(grads(), grads()):
        assert torch.equal(a, b)


@pytest.mark.gpu
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


@pytest.mark.gpu
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


@pytest.mark.gpu
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


@pytest.mark.gpu
@pytest.mark.parametrize("what,match", [("float64", "float64"), ("n33", "N <= 32")])
def test_unsupported_input_is_a_clear_error(what, match):
    ndim = 33 if what == "n33" else 4
    dtype = torch.float64 if what == "float64" else torch.float32
    params = [p.to(dtype).cuda() for p in ema_params(8, ndim, dtype=dtype)]
    x = torch.randn(1, 5, 8, dtype=dtype, device="cuda")
    with pytest.raises(RuntimeError, match=match):
        ops.ema(x, *params, backend="cuda")
