"""`mega-kernels` info / check: the table, and a non-zero exit when a backend is wrong."""
import pytest
import torch

from mega_kernels import cli
from mega_kernels.ops import backends
from mega_kernels.reference.ema import ema_fft


def _fake_backend(monkeypatch, impl):
    entry = backends._Entry("unused", "unused", lambda d: None if d.type == "cpu" else "cpu only")
    entry._impl = impl
    monkeypatch.setitem(backends._REGISTRY["ema"], "cpu", entry)


def test_info_lists_every_backend(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    for name in ("reference", "triton", "cpu", "cuda"):
        assert name in out
    assert "torch" in out


def test_info_shows_the_extension_and_its_threads(capsys):
    from mega_kernels import _build, _ext

    assert cli.main(["info"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("extension"))
    if _ext.load()["ok"]:
        threads = torch.get_num_threads() if _build.openmp_flags() else 1
        assert f"CPU kernels on {threads} of {torch.get_num_threads()} torch threads" in line
    else:
        assert "unavailable: " in line


def test_info_names_a_backend_variable_that_cannot_run(monkeypatch, capsys):
    """info is where a user looks when MEGA_KERNELS_BACKEND names a backend that cannot run: it says so."""
    monkeypatch.setattr(cli, "_devices", lambda: [torch.device("cpu")])
    monkeypatch.setitem(backends._REGISTRY["ema"], "cpu", backends._Entry("x", "y", lambda d: "not built here"))
    monkeypatch.setenv(backends.ENV_VAR, "cpu")
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "ema       auto: ema: MEGA_KERNELS_BACKEND='cpu' cannot run on cpu: not built here" in out
    assert "attention reference available  <- auto" in out  # (attention has no cpu kernel: auto decides it)


def test_check_passes_a_correct_backend(monkeypatch, capsys):
    _fake_backend(monkeypatch, ema_fft)
    assert cli.main(["check", "--device", "cpu", "--op", "ema", "--backend", "cpu"]) == 0
    assert "ema/cpu/float32/uni" in capsys.readouterr().out


def test_check_fails_a_wrong_backend(monkeypatch, capsys):
    def wrong(x, a, q, c, omega, **kw):
        return ema_fft(x, a, q, c, omega * 1.001, **kw)

    _fake_backend(monkeypatch, wrong)
    assert cli.main(["check", "--device", "cpu", "--op", "ema", "--backend", "cpu"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_bench_unknown_name_is_an_error(capsys):
    assert cli.main(["bench", "no_such_benchmark"]) == 2
    assert "choose one of: attention, ema" in capsys.readouterr().err  # a source checkout lists them
    assert cli.main(["bench"]) == 2  # no name: the list, not argparse's "arguments are required"
    assert "name a benchmark; choose one of: attention, ema" in capsys.readouterr().err


@pytest.mark.parametrize("device,match", [("xyz", "--device must be cpu or cuda"),
                                          ("meta", "--device must be cpu or cuda")]
                         + ([] if torch.cuda.is_available() else [("cuda", "CUDA is not available")]))
def test_check_refuses_an_unusable_device(device, match):
    with pytest.raises(SystemExit, match=match):
        cli.main(["check", "--device", device])


def test_check_of_an_unavailable_backend_that_was_asked_for_fails(monkeypatch, capsys):
    entry = backends._Entry("unused", "unused", lambda d: "pretend it is missing")
    monkeypatch.setitem(backends._REGISTRY["ema"], "cpu", entry)
    assert cli.main(["check", "--device", "cpu", "--op", "ema", "--backend", "cpu"]) == 1
    assert "skipped ema/cpu: pretend it is missing" in capsys.readouterr().out


def test_check_of_a_backend_the_op_lacks_says_so(capsys):
    assert cli.main(["check", "--device", "cpu", "--op", "attention", "--backend", "cpu"]) == 1
    assert "backend cpu runs none of attention on cpu (kernel backends: {'attention': ['triton']}" in \
        capsys.readouterr().out


@pytest.mark.parametrize("op", ["ema", "model"])
def test_check_probes_only_the_backends_asked_for(monkeypatch, capsys, op):
    """check --backend triton never probes cpu (which would load, or build, the extension)."""
    probed = []
    entry = backends._Entry("unused", "unused", lambda d: probed.append(d) or "probed")
    monkeypatch.setitem(backends._REGISTRY["ema"], "cpu", entry)
    cli.main(["check", "--device", "cpu", "--op", op, "--backend", "triton"])
    assert probed == []
    cli.main(["check", "--device", "cpu", "--op", op, "--backend", "cpu"])
    assert probed


def test_check_runs_the_backends_inside_models(monkeypatch, capsys):
    assert cli.main(["check", "--device", "cpu", "--op", "model", "--backend", "cpu"]) == 0
    out = capsys.readouterr().out
    for row in ("model/cpu/float32/CausalLM", "model/cpu/float64/SequenceClassification"):
        assert row in out
    assert "param grads" in out and "FAIL" not in out

    def wrong(x, a, q, c, omega, **kw):
        return ema_fft(x, a, q, c, omega * 1.001, **kw)

    _fake_backend(monkeypatch, wrong)
    assert cli.main(["check", "--device", "cpu", "--op", "model", "--backend", "cpu"]) == 1
    assert capsys.readouterr().out.count("FAIL") == 4


def test_info_states_the_auto_limits(monkeypatch, capsys):
    """Where auto applies its own per-call limits (attention's short blocks and wide Z, the CUDA EMA's N), info
    says so beside the mark instead of claiming the kernel for every call."""
    monkeypatch.setattr(cli, "_devices", lambda: [torch.device("cpu")])
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    monkeypatch.setitem(backends.AUTO_ORDER, ("attention", "cpu"), ("triton",))
    monkeypatch.setitem(backends._REGISTRY["attention"], "triton", backends._Entry("x", "y", lambda d: None))
    assert cli.main(["info"]) == 0
    assert "attention triton    available  <- auto for blocks of more than 4096 keys and Z <= 256; the reference " \
           "otherwise" in capsys.readouterr().out
