"""The compiled extension as a whole: it builds (or says why not), its op schemas match ops/ema.py, the ops
pass torch.library.opcheck (schema, fake tensors, autograd registration, AOT dispatch), torch.compile traces
them without graph breaks, bad input gets a clear error, and a machine without a compiler still imports."""
import os
import subprocess
import sys

import pytest
import torch

from helpers import ema_params, in_ci, random_mask
from mega_kernels import _ext, ops
from mega_kernels.ops.ema import EMA_BWD_SCHEMA, EMA_FWD_SCHEMA, EMA_STEP_SCHEMA
from mega_kernels.reference.ema import ema_coefficients

_REASON = _ext.unavailable_reason(torch.device("cpu"))
needs_ext = pytest.mark.skipif(_REASON is not None and not in_ci(),
                               reason=f"C++ extension unavailable: {_REASON}")


def test_extension_builds_in_ci():
    if not in_ci() and _REASON is not None:
        pytest.skip(f"not CI; extension unavailable here: {_REASON}")
    assert _REASON is None, _REASON


@needs_ext
@pytest.mark.parametrize("name,schema", [("ema_fwd", EMA_FWD_SCHEMA), ("ema_bwd", EMA_BWD_SCHEMA),
                                         ("ema_step", EMA_STEP_SCHEMA)])
def test_schemas_match_python(name, schema):
    import mega_kernels.ops.ema_ext  # noqa: F401  (loads the library)

    got = getattr(torch.ops.mega_kernels, name).default._schema
    assert str(got) == str(torch._C.parse_schema(f"mega_kernels::{name}{schema}"))


def _fwd_args(dtype, bidirectional=False, truncation=0, state=False, masked=True, requires_grad=True):
    bsz, length, dim, ndim = 2, 9, 5, 3
    delta, alpha, beta, gamma, omega = ema_params(dim, ndim, bidirectional, dtype=dtype)
    a, q, c = (t.detach().requires_grad_(requires_grad) for t in ema_coefficients(delta, alpha, beta, gamma))
    x = torch.randn(bsz, length, dim, dtype=dtype, requires_grad=requires_grad)
    omega.requires_grad_(requires_grad)
    mask = random_mask(bsz, length) if masked else None
    s = torch.randn(bsz, dim, ndim, dtype=dtype, requires_grad=requires_grad) if state else None
    return (x, a, q, c, omega, mask, s, bidirectional, truncation, state)


OPCHECK_CASES = {
    "uni_state": dict(state=True),
    "bi_mask": dict(bidirectional=True),
    "trunc_nomask": dict(truncation=4, masked=False),
}


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", OPCHECK_CASES)
def test_opcheck_fwd_bwd(case, dtype):
    import mega_kernels.ops.ema_ext  # noqa: F401

    args = _fwd_args(dtype, **OPCHECK_CASES[case])
    torch.library.opcheck(torch.ops.mega_kernels.ema_fwd.default, args)
    x, a, q, c, omega, mask, s, bi, trunc, ret = args
    gy = torch.randn_like(x)
    gs = torch.randn_like(s) if s is not None else None
    bwd_args = (gy, gs, x.detach(), a.detach(), q.detach(), c.detach(), omega.detach(), mask,
                None if s is None else s.detach(), bi, trunc)
    torch.library.opcheck(torch.ops.mega_kernels.ema_bwd.default, bwd_args)


@needs_ext
def test_opcheck_step():
    import mega_kernels.ops.ema_ext  # noqa: F401

    x, a, q, c, omega, _, _, _, _, _ = _fwd_args(torch.float32, requires_grad=False)
    state = torch.randn(x.shape[0], x.shape[2], a.shape[1])
    mask = torch.tensor([True, False])
    torch.library.opcheck(torch.ops.mega_kernels.ema_step.default, (x[:, 0], a, q, c, omega, state, mask),
                          test_utils=("test_schema", "test_faketensor"))


@needs_ext
@pytest.mark.parametrize("bidirectional", [False, True])
def test_torch_compile_traces_without_graph_breaks(bidirectional):
    params = ema_params(6, 4, bidirectional, dtype=torch.float32, requires_grad=True)
    x = torch.randn(2, 11, 6, requires_grad=True)
    mask = random_mask(2, 11)

    def fn(x, *params):
        return ops.ema(x, *params, mask=mask, bidirectional=bidirectional, backend="cpu")

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    y_eager, y_comp = fn(x, *params), compiled(x, *params)
    torch.testing.assert_close(y_comp, y_eager)
    g_eager = torch.autograd.grad(y_eager.sum(), [x] + params)
    g_comp = torch.autograd.grad(y_comp.sum(), [x] + params)
    for a, b in zip(g_comp, g_eager):
        torch.testing.assert_close(a, b)


@needs_ext
@pytest.mark.parametrize("change,match", [
    (lambda a: a.update(mask=a["mask"].float()), "mask must be bool"),
    (lambda a: a.update(a=a["a"][:, :2]), "q must have a's shape"),
    (lambda a: a.update(omega=a["omega"][:3]), "omega must be"),
    (lambda a: a.update(bidirectional=True), "a must be \\(10, N\\)"),
    (lambda a: a.update(state=torch.zeros(2, 5, 2)), "state must be \\(B, D, N\\)"),
    (lambda a: a.update(truncation=-1), "truncation must be >= 0"),
    (lambda a: a.update(truncation=2**31), "truncation must be below 2\\^31"),
    (lambda a: a.update(x=a["x"][0]), "x must be \\(B, L, D\\)"),
])
def test_bad_input_names_the_argument(change, match):
    import mega_kernels.ops.ema_ext  # noqa: F401

    x, a, q, c, omega, mask, _, bi, trunc, ret = _fwd_args(torch.float32, requires_grad=False)
    kw = dict(x=x, a=a, q=q, c=c, omega=omega, mask=mask, state=None, bidirectional=bi, truncation=trunc,
              return_state=ret)
    change(kw)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.mega_kernels.ema_fwd(*kw.values())


@needs_ext
@pytest.mark.parametrize("change,match", [
    (lambda a: a.update(grad_y=a["grad_y"][:, :-1]), "grad_y must have x's shape"),
    (lambda a: a.update(grad_y=a["grad_y"].to(torch.int32)), "grad_y must be a floating tensor"),
    (lambda a: a.update(grad_state=torch.ones(2, 5, 2)), "grad_state must be \\(B, D, N\\)"),
    (lambda a: a.update(grad_state=torch.ones(2, 5, 3, dtype=torch.int64)), "grad_state must be a floating"),
])
def test_bad_gradients_name_the_argument(change, match):
    """ema_bwd's gradient arguments go through the same shared checks (ema_checks.h) on every device."""
    import mega_kernels.ops.ema_ext  # noqa: F401

    x, a, q, c, omega, mask, _, bi, trunc, _ = _fwd_args(torch.float32, requires_grad=False)
    kw = dict(grad_y=torch.randn_like(x), grad_state=None, x=x, a=a, q=q, c=c, omega=omega, mask=mask,
              state=None, bidirectional=bi, truncation=trunc)
    change(kw)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.mega_kernels.ema_bwd(*kw.values())


@needs_ext
def test_python_guard_refuses_n33_on_cuda_with_the_cpp_message():
    """The guard before the op (ema_ext._check_cuda_n) says what the C++ check says (the emulator tests in
    test_ema_cuda.py run that check itself); a CUDA tensor is stood in for, so this runs without a GPU."""
    import types

    from mega_kernels.ops import ema_ext

    a = torch.zeros(8, 33)
    with pytest.raises(ValueError, match="N = 33 exceeds the CUDA kernels' maximum of 32 .*backend='triton'"):
        ema_ext._check_cuda_n(types.SimpleNamespace(is_cuda=True), a)
    ema_ext._check_cuda_n(types.SimpleNamespace(is_cuda=True), a[:, :32])  # N = 32 is fine
    ema_ext._check_cuda_n(torch.zeros(1, 5, 8), a)  # the CPU kernels have no limit on N


@needs_ext
@pytest.mark.parametrize("bidirectional", [False, True])
def test_cpu_backend_takes_n33(bidirectional):
    """N > 32 is a limit of the CUDA kernels only: the cpu backend runs N = 33 and matches the reference."""
    params = ema_params(8, 33, bidirectional, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 37, 8, dtype=torch.float64, requires_grad=True)
    outs = [ops.ema(x, *params, bidirectional=bidirectional, backend=b) for b in ("cpu", "reference")]
    torch.testing.assert_close(outs[0], outs[1])
    grads = [torch.autograd.grad(o.sum(), [x] + params) for o in outs]
    for g_cpu, g_ref in zip(*grads):
        torch.testing.assert_close(g_cpu, g_ref)


def test_import_without_a_compiler_reports_the_reason(tmp_path):
    """No compiler: import works, the cpu backend says why it is unavailable, auto falls back, an explicit
    request raises BackendUnavailable."""
    code = (
        "import sys, torch\n"
        "sys.modules['mega_kernels._C'] = None  # ignore any prebuilt library\n"
        "import mega_kernels\n"
        "from mega_kernels import _ext, ops\n"
        "from mega_kernels.ops.backends import BackendUnavailable, resolve\n"
        "r = _ext.unavailable_reason('cpu')\n"
        "assert r and 'failed' in r, r\n"
        "assert resolve('ema', 'auto', torch.device('cpu')) == 'reference'\n"
        "try:\n"
        "    resolve('ema', 'cpu', torch.device('cpu'))\n"
        "    raise SystemExit('no error')\n"
        "except BackendUnavailable as e:\n"
        "    assert 'failed' in str(e)\n"
        "print('OK', r)\n")
    assert "OK" in _without_a_compiler(code, tmp_path).stdout


def _without_a_compiler(code: str, cache) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter whose C++ compiler always fails, with the extension cache at `cache`."""
    env = dict(os.environ, MEGA_KERNELS_CACHE=str(cache), CXX="/bin/false", MEGA_KERNELS_BACKEND="")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stdout + out.stderr
    return out


def test_a_killed_build_does_not_hang_the_next(tmp_path):
    """torch's JIT build leaves its `lock` file behind when killed, and the next build would wait on it
    forever; the next build here removes it and goes on (to the compiler error, as CXX is /bin/false)."""
    code = (
        "import sys, torch\n"
        "sys.modules['mega_kernels._C'] = None\n"
        "from mega_kernels import _build, _ext\n"
        "for cuda in (False, True):\n"
        "    tag = _ext._digest(_build.sources(cuda) + _build.HEADERS, cuda)\n"
        "    (_ext.cache_root() / tag).mkdir(parents=True)\n"
        "    (_ext.cache_root() / tag / 'lock').touch()\n"
        "r = _ext.unavailable_reason('cpu')\n"
        "assert r and 'failed' in r, r\n"
        "print('OK')\n")
    out = _without_a_compiler(code, tmp_path)
    assert "removing" in out.stderr and "OK" in out.stdout


def test_build_lock_is_exclusive(tmp_path):
    pytest.importorskip("fcntl")
    take = "import fcntl, sys; fcntl.flock(open(sys.argv[1], 'a'), fcntl.LOCK_EX | fcntl.LOCK_NB)"
    with _ext._build_lock(tmp_path):
        held = subprocess.run([sys.executable, "-c", take, str(tmp_path / "build.lock")], capture_output=True)
        assert held.returncode != 0 and b"BlockingIOError" in held.stderr
    free = subprocess.run([sys.executable, "-c", take, str(tmp_path / "build.lock")], capture_output=True)
    assert free.returncode == 0, free.stderr


def test_cache_key_names_the_gpu_architectures(monkeypatch):
    """A CUDA build's cache folder depends on the architectures it targets (TORCH_CUDA_ARCH_LIST, else the visible
    GPUs'), so a cache built for another GPU is never loaded; the CPU-only key ignores them."""
    from mega_kernels import _build

    files = _build.sources(True) + _build.HEADERS
    keys = {}
    for archs in ("8.0", "9.0", "8.0;9.0"):
        monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", archs)
        keys[archs] = (_ext._digest(files, True), _ext._digest(files, False))
    assert len({cuda for cuda, _ in keys.values()}) == 3
    assert len({cpu for _, cpu in keys.values()}) == 1


def test_cache_key_names_the_source_folder(tmp_path, monkeypatch):
    """Two copies of the same sources build in folders of their own (ninja would rebuild a shared one whenever the
    other copy loads, as its commands name the sources by path); the key of one copy is stable."""
    import shutil

    from mega_kernels import _build

    files = _build.sources(False) + _build.HEADERS
    for rel in files:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(_build.ROOT / rel, tmp_path / rel)
    here = _ext._digest(files, False)
    monkeypatch.setattr(_build, "ROOT", tmp_path)
    there = _ext._digest(files, False)
    assert there != here and there == _ext._digest(files, False)


def test_prebuilt_library_is_stale_only_in_a_source_checkout(tmp_path, monkeypatch):
    """A prebuilt library older than csrc/ or _build.py is rebuilt in a checkout; an installed package's shipped
    csrc/ copy (whose file times the installer does not keep) never makes its own library stale."""
    import time

    from mega_kernels import _build

    lib = tmp_path / "_C.so"
    lib.write_bytes(b"")
    os.utime(lib, (0, 0))
    assert _ext._prebuilt_is_stale(str(lib))
    os.utime(lib, (time.time() + 3600,) * 2)
    assert not _ext._prebuilt_is_stale(str(lib))
    os.utime(lib, (0, 0))
    monkeypatch.setattr(_build, "ROOT", _build.PACKAGE / "_csrc_root")
    assert not _ext._prebuilt_is_stale(str(lib))


@needs_ext
def test_a_single_threaded_build_is_reported(monkeypatch, caplog):
    """A build whose CPU kernels reach fewer threads than torch has (no OpenMP) is logged when it loads."""
    from mega_kernels import _build

    _ext._warn_if_single_threaded()
    assert ("built without OpenMP" in caplog.text) == (not _build.openmp_flags() and torch.get_num_threads() > 1)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4 * _ext.cpu_threads())
    _ext._warn_if_single_threaded()
    assert "built without OpenMP" in caplog.text


def test_ci_builds_with_openmp():
    """CI runs GCC on Linux with an OpenMP torch: there the CPU kernels must be built to use every thread."""
    from mega_kernels import _build

    if not in_ci():
        pytest.skip("CI only: other machines may lack GCC or an OpenMP torch")
    assert _build.openmp_flags() == ("-fopenmp",)
