"""What is specific to the `cuda` EMA backend (csrc/ema/ema_cuda.cu); the backend-generic tests (forward,
backward, state, truncation, float16/bfloat16, decoding, gradcheck) run it from tests/test_ema_backends.py.

Without a GPU: the kernels' thread functions (csrc/ema/ema_cuda_threads.cuh) run on the CPU through
csrc/testing/ema_cuda_emulator.cpp, in launch order, against the float64 reference (chunking, the prefix pass,
truncation windows across chunks, states, padded N, blocked gradient sums, NaN-filled outputs), and the
argument checks the CUDA ops run before anything is allocated or launched (ema_checks.h: N > 32, empty inputs).
On a GPU (marked `gpu`): many chunks of the chunked forward scan, outputs poisoned with NaN beforehand, a
bfloat16 shape of realistic size, opcheck and torch.compile on CUDA, determinism, non-contiguous input, a side
stream, and the errors for what the backend does not take.
"""
import contextlib
import hashlib

import pytest
import torch

from helpers import assert_close_to_reference, ema_params, in_ci, random_mask
from mega_kernels import _build, _ext, ops
from mega_kernels.reference.ema import ema_coefficients, ema_fft
from mega_kernels.reference.ema import ema_step as ref_step
from test_ema_backends import _check_against_reference, _inputs

_EMULATOR_FILES = ["csrc/testing/ema_cuda_emulator.cpp", "csrc/ema/ema_cuda_threads.cuh",
                   "csrc/ema/ema_cuda_threads_bwd.cuh",
                   "csrc/ema/ema_kernels.cuh", "csrc/ema/ema_cuda.h", "csrc/ema/ema_checks.h"]
N33_ERROR = "N = 33 exceeds the CUDA kernels' maximum of 32 .*use backend='triton' or 'reference'"


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

    flags = ["-O1"]  # builds in ~40 s instead of ~65 s at -O2; its tests run in ~1.5 s either way
    # (the source folder too: ninja rebuilds a folder whose commands name other paths, see _ext._digest)
    digest = hashlib.sha256((torch.__version__ + str(flags) + str(_build.ROOT.resolve())).encode())
    for rel in _EMULATOR_FILES:
        digest.update((_build.ROOT / rel).read_bytes())
    tag = digest.hexdigest()[:16]
    build_dir = _ext.cache_root() / f"emulator-{tag}"
    build_dir.mkdir(parents=True, exist_ok=True)
    try:
        with _ext._build_lock(build_dir):  # (xdist workers build it once; a killed build's `lock` is removed)
            return cpp_extension.load(name=f"mega_kernels_cuda_emulator_{tag}", build_directory=str(build_dir),
                                      sources=[str(_build.ROOT / _EMULATOR_FILES[0])], extra_cflags=flags)
    except Exception as exc:
        if in_ci():
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
    # N in 17..31, not a multiple of 8: a thread's second group of states is partial, and a write past N would
    # land on the next channel's states
    "n20_state": (2, 100, 5, 20, False, 0, True),
    "n1_bi_window": (1, 50, 3, 1, True, 7, False),
    # N > 16: the backward forms g first, then sums the states 16 at a time (and its prefix takes 8 per thread)
    "n32_bi": (2, 100, 5, 32, True, 0, False),
    "n20_window": (2, 130, 4, 20, False, 9, False),
    "n27_bi_window": (2, 100, 3, 27, True, 40, False),
    # 35 chunks: the prefix passes load 16, 8 or 4 chunks ahead (walk_chunks), so several full groups and a
    # partial one
    "many_chunks_state": (2, 1100, 3, 3, False, 0, True),
    "many_chunks_n20_bi": (1, 1100, 3, 20, True, 0, False),
}


@pytest.mark.parametrize("case", EMULATOR_CASES)
def test_cuda_kernel_logic_on_cpu(emulator, case):
    _check_emulator(emulator, case, *EMULATOR_CASES[case])


def _zero_and_tiny(coef):
    coef = coef.clone()
    coef[::3] = 0.0
    coef[1::4, -1] = 1e-30
    return coef


@pytest.mark.parametrize("case", ["chunks_state", "chunks_bi", "window_across_chunks", "n1_bi_window", "n32_state",
                                  "n27_bi_window"])
def test_cuda_kernel_logic_zero_and_tiny_input_coefficients(emulator, case):
    """Input coefficients a = sigmoid(delta) beta exactly 0 or ~1e-30 (below the 2^-64 floor of the scaled
    state g = h / a' of the output sweeps, and of the backward's scaled P and h in its local and parameter
    sweeps): the state still enters, decays and leaves exactly (chunk states across several chunks, a state in
    and out, windows, the parameter sums 16 states at a time)."""
    _check_emulator(emulator, case, *EMULATOR_CASES[case], edit_beta=_zero_and_tiny)


@pytest.mark.parametrize("case", ["chunks_state", "chunks_bi", "window_across_chunks_bi", "n32_state", "n27_bi_window"])
def test_cuda_kernel_logic_zero_and_tiny_output_coefficients(emulator, case):
    """Output coefficients c = gamma / sqrt(N) exactly 0 or ~1e-30 (below the 2^-64 floor of the adjoint's
    scaled form mu = lam / c'): the carry from later chunks and the final-state gradient still pass through."""
    _check_emulator(emulator, case, *EMULATOR_CASES[case], edit_gamma=_zero_and_tiny)


@pytest.mark.parametrize("case", ["chunks_state", "chunks_bi", "window_across_chunks_bi", "n1_bi_window", "n32_bi",
                                  "n20_window"])
def test_cuda_kernel_logic_without_mask(emulator, case):
    """No mask: the kernels compiled without the mask (a separate instantiation of every sweep over x)."""
    _check_emulator(emulator, case, *EMULATOR_CASES[case], masked=False)


def _check_emulator(emulator, case, bsz, length, dim, ndim, bidirectional, truncation, with_state, edit_beta=None,
                    masked=True, edit_gamma=None):
    """Forward (y, final state) and backward of the emulated CUDA kernels vs the float64 reference."""
    delta, alpha, beta, gamma, omega = ema_params(dim, ndim, bidirectional)
    if edit_beta is not None:
        beta = edit_beta(beta)
    if edit_gamma is not None:
        gamma = edit_gamma(gamma)
    a, q, c = ema_coefficients(delta, alpha, beta, gamma)
    x = torch.randn(bsz, length, dim, dtype=torch.float64)
    mask = random_mask(bsz, length) if masked else None
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
    names = ["y"] + (["final_state"] if with_state else []) + ["dx", "da", "dq", "dc", "domega"] + \
        (["dstate"] if with_state else [])
    for reverse in (False, True):  # threads and blocks of each launch in both orders (a stray write shows in one)
        with _thread_order(emulator, reverse):
            y, final, plan = emulator.fwd(f(x), co, f(omega), mask, f(state), bidirectional, truncation, with_state)
            grads = emulator.bwd(f(gy), f(gs), f(x), co, f(omega), mask, f(state), bidirectional, truncation)
        if case.startswith(("chunks", "window", "n2", "n32")):
            assert plan[1] > 1, "the case must span several chunks"
        got = [y] + ([final] if with_state else []) + list(grads[:5]) + ([grads[5]] if with_state else [])
        for name, o, r64, r32 in zip(names, got, ref64, ref32):
            assert_close_to_reference(f"{case} {name} reverse={reverse}", o, r64, r32)


@contextlib.contextmanager
def _thread_order(emulator, reverse):
    emulator.set_reverse(reverse)
    try:
        yield
    finally:
        emulator.set_reverse(False)


@pytest.mark.parametrize("ndim", [16, 5, 20])
def test_cuda_step_logic_on_cpu(emulator, ndim):
    """The decoding step, with N filling its register array or not (5, 20: the loop must stop at N)."""
    delta, alpha, beta, gamma, omega = ema_params(9, ndim)
    a, q, c = ema_coefficients(delta, alpha, beta, gamma)
    x = torch.randn(3, 9, dtype=torch.float64)
    state = torch.randn(3, 9, ndim, dtype=torch.float64)
    mask = torch.tensor([True, False, True])
    ref = ref_step(x, a, q, c, omega, state, mask)
    low = ref_step(x.float(), a.float(), q.float(), c.float(), omega.float(), state.float(), mask)
    for reverse in (False, True):
        with _thread_order(emulator, reverse):
            got = emulator.step(x.float(), _coefs(a, q, c, 0), omega.float(), state.float(), mask)
        for name, o, r64, r32 in zip(("y", "state"), got, ref, low):
            assert_close_to_reference(f"{name} reverse={reverse}", o, r64, r32)


def _emulator_args(bsz, length, dim, ndim, bidirectional=False):
    delta, alpha, beta, gamma, omega = ema_params(dim, ndim, bidirectional)
    a, q, c = ema_coefficients(delta, alpha, beta, gamma)
    x = torch.randn(bsz, length, dim)
    return x, _coefs(a, q, c, 0), omega.float()


@pytest.mark.parametrize("entry", ["fwd", "bwd", "step"])
def test_cuda_checks_refuse_n33(emulator, entry):
    """N = 33: the CUDA ops' own check (check_cuda_args, run by the emulator as by ema_cuda_ops.cpp) raises
    before any kernel code runs; the kernels' register arrays hold at most 32 states."""
    x, co, omega = _emulator_args(2, 9, 5, 33)
    with pytest.raises(ValueError, match=f"ema_{entry} \\(cuda\\): {N33_ERROR}"):
        if entry == "fwd":
            emulator.fwd(x, co, omega, None, None, False, 0, False)
        elif entry == "bwd":
            emulator.bwd(torch.randn_like(x), None, x, co, omega, None, None, False, 0)
        else:
            emulator.step(x[:, 0], co, omega, torch.randn(2, 5, 33), None)


@pytest.mark.parametrize("bsz,length,bidirectional,match", [
    (65536, 1, False, "B = 65536 exceeds the CUDA grid limit of 65535 rows"),
    (32768, 1, True, r"B = 32768 \(x 2 directions\) exceeds the CUDA grid limit of 65535 rows"),
    (1, 65536 * 32 + 1, False, "chunks, more than the CUDA grid limit of 65535"),
])
def test_cuda_checks_refuse_grids_past_the_limits(emulator, bsz, length, bidirectional, match):
    """Inputs whose launch grid would exceed CUDA's limits are refused (ValueError) before anything runs."""
    x, co, omega = _emulator_args(bsz, length, 1, 2, bidirectional)
    with pytest.raises(ValueError, match=match):
        emulator.fwd(x, co, omega, None, None, bidirectional, 0, False)
    with pytest.raises(ValueError, match=match):
        emulator.bwd(torch.randn_like(x), None, x, co, omega, None, None, bidirectional, 0)


def test_cuda_chunk_limit_is_each_passs_own(emulator):
    """B1 L 65536 * 256 + 1 D4: the forward's plan takes chunks of 288 steps (58255 chunks, within the grid),
    the backward's at most 256 (65537, beyond it). The forward runs (inference was refused for the backward's
    plan); the backward is refused."""
    length = 65536 * 256 + 1
    x, co, omega = _emulator_args(1, length, 4, 1, False)
    y, _, plan = emulator.fwd(x, co, omega, None, None, False, 0, False)
    assert plan[1] <= 65535 and torch.isfinite(y[0, -4:]).all()
    with pytest.raises(ValueError, match="ema_bwd \\(cuda\\): L = 16777217 needs 65537 chunks"):
        emulator.bwd(torch.randn_like(x), None, x, co, omega, None, None, False, 0)


def test_cuda_checks_accept_n32_and_refuse_bad_grads(emulator):
    x, co, omega = _emulator_args(2, 9, 5, 32)
    y, _, _ = emulator.fwd(x, co, omega, None, None, False, 0, False)
    assert torch.isfinite(y).all()
    with pytest.raises(RuntimeError, match="grad_y must have x's shape"):
        emulator.bwd(torch.randn(2, 8, 5), None, x, co, omega, None, None, False, 0)
    with pytest.raises(RuntimeError, match="grad_state must be \\(B, D, N\\)"):
        emulator.bwd(torch.randn_like(x), torch.randn(2, 5, 31), x, co, omega, None, None, False, 0)


@pytest.mark.parametrize("bsz,length,dim", [(0, 40, 5), (2, 40, 0), (2, 0, 5)])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_empty_inputs_plan_without_dividing_by_zero(emulator, bsz, length, dim, bidirectional):
    """An empty batch (B = 0 or D = 0) with L > 0: the chunk plan divided by B * D, so the backward's
    bwd_chunks(B, L, D) in ema_cuda_ops.cpp (and the emulator) died with SIGFPE, killing the process."""
    x, co, omega = _emulator_args(bsz, length, dim, 4, bidirectional)
    y, _, plan = emulator.fwd(x, co, omega, None, None, bidirectional, 0, False)
    assert y.shape == x.shape and plan[1] >= 0
    dx, da, dq, dc, domega, _ = emulator.bwd(torch.randn_like(x), None, x, co, omega, None, None, bidirectional, 0)
    assert dx.shape == x.shape
    for g in (da, dq, dc):
        assert g.shape == co[0].shape and not g.abs().sum()


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
@pytest.mark.parametrize("what,match,error", [("float64", "float64", TypeError), ("n33", N33_ERROR, ValueError)])
def test_unsupported_input_is_a_clear_error(what, match, error):
    ndim = 33 if what == "n33" else 4
    dtype = torch.float64 if what == "float64" else torch.float32
    params = [p.to(dtype).cuda() for p in ema_params(8, ndim, dtype=dtype)]
    x = torch.randn(1, 5, 8, dtype=dtype, device="cuda")
    with pytest.raises(error, match=match):
        ops.ema(x, *params, backend="cuda")


def _cuda_op_args(ndim, bsz=2, length=9, dim=8):
    import mega_kernels.ops.ema_ext  # noqa: F401  (loads the library)

    delta, alpha, beta, gamma, omega = (p.float().cuda() for p in ema_params(dim, ndim))
    a, q, c = ema_coefficients(delta, alpha, beta, gamma)
    x = torch.randn(bsz, length, dim, device="cuda")
    return x, a, q, c, omega


@pytest.mark.gpu
@pytest.mark.parametrize("op", ["ema_fwd", "ema_bwd", "ema_step"])
def test_registered_ops_refuse_n33_without_the_python_guard(op):
    """The torch.library ops called directly (no Python guard): N = 33 is a ValueError from the C++ check,
    raised before any allocation or launch, and the process and the device stay usable (GPU run 2 segfaulted)."""
    x, a, q, c, omega = _cuda_op_args(33)
    state = torch.randn(x.shape[0], x.shape[2], 33, device="cuda")
    with pytest.raises(ValueError, match=N33_ERROR):
        if op == "ema_fwd":
            torch.ops.mega_kernels.ema_fwd(x, a, q, c, omega, None, state, False, 0, True)
        elif op == "ema_bwd":
            torch.ops.mega_kernels.ema_bwd(torch.randn_like(x), None, x, a, q, c, omega, None, None, False, 0)
        else:
            torch.ops.mega_kernels.ema_step(x[:, 0], a, q, c, omega, state, None)
    torch.cuda.synchronize()  # no launch was made, so no asynchronous error is pending either
    x, a, q, c, omega = _cuda_op_args(32)
    y, _ = torch.ops.mega_kernels.ema_fwd(x, a, q, c, omega, None, None, False, 0, False)
    assert torch.isfinite(y).all()


@pytest.mark.gpu
def test_registered_ops_take_empty_inputs():
    """B = 0 with L > 0: ema_bwd planned its chunks by dividing by B * D (SIGFPE, the process died)."""
    for bsz, length, dim in [(0, 40, 8), (2, 0, 8), (2, 40, 0)]:
        x, a, q, c, omega = _cuda_op_args(4, bsz, length, dim)
        y, _ = torch.ops.mega_kernels.ema_fwd(x, a, q, c, omega, None, None, False, 0, False)
        grads = torch.ops.mega_kernels.ema_bwd(torch.randn_like(x), None, x, a, q, c, omega, None, None, False, 0)
        assert y.shape == x.shape and grads[0].shape == x.shape and not grads[1].abs().sum()
    torch.cuda.synchronize()


@pytest.mark.gpu
def test_registered_ops_refuse_mixed_devices():
    """grad_y on CUDA with everything else on the CPU sends ema_bwd to the CUDA kernel (the dispatcher picks
    CUDA when any tensor is on it): a clear error, not CPU pointers handed to a kernel."""
    x, a, q, c, omega = (t.cpu() for t in _cuda_op_args(4))
    with pytest.raises(RuntimeError, match="grad_y is on cuda"):
        torch.ops.mega_kernels.ema_bwd(torch.randn_like(x).cuda(), None, x, a, q, c, omega, None, None, False, 0)
