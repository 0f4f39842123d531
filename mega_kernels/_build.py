"""The compiled extension's definition (csrc/), shared by the JIT build (`_ext.py`) and setup.py.

setup.py calls `extension()` when MEGA_KERNELS_BUILD_EXT=1 (with --no-build-isolation, so the installed
torch is used) and builds `mega_kernels._C`; otherwise `_ext.py` JIT-builds the same sources with ninja on
first use. CUDA sources join only when torch has CUDA and nvcc is found (`cuda_unavailable_reason`).
"""
from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path
from typing import List, Optional, Tuple

PACKAGE = Path(__file__).resolve().parent
# A source checkout (or editable install) has csrc/ beside the package; a wheel ships it inside (setup.py).
ROOT = PACKAGE.parent if (PACKAGE.parent / "csrc").is_dir() else PACKAGE / "_csrc_root"
CSRC = ROOT / "csrc"
CPU_SOURCES = ["csrc/registration.cpp", "csrc/ema/ema_cpu.cpp"]
# The CUDA kernels are instantiated once per I/O dtype in files of their own, which ninja compiles in parallel.
CUDA_SOURCES = ["csrc/ema/ema_cuda.cu", "csrc/ema/ema_cuda_f32.cu", "csrc/ema/ema_cuda_f16.cu",
                "csrc/ema/ema_cuda_bf16.cu", "csrc/ema/ema_cuda_ops.cpp"]
HEADERS = ["csrc/ema/ema_kernels.cuh", "csrc/ema/ema_checks.h", "csrc/ema/ema_cuda.h",
           "csrc/ema/ema_cuda_threads.cuh", "csrc/ema/ema_cuda_threads_bwd.cuh", "csrc/ema/ema_cuda_launch.cuh"]


@functools.lru_cache(maxsize=None)
def openmp_flags() -> Tuple[str, ...]:
    """("-fopenmp",) when torch's own parallel backend is OpenMP (every Linux wheel) and the C++ compiler is GCC.

    at::parallel_for is a header template that splits work only when the including file is compiled with
    OpenMP (_OPENMP defined), and otherwise runs the whole range on the calling thread. Linked with it, the
    extension binds to the libgomp that torch has already loaded (same soname), so torch.set_num_threads governs
    both. Not with clang: its -fopenmp links another runtime (libomp), a second thread pool that
    torch.set_num_threads does not size. `mega-kernels info` shows the threads a build reaches."""
    import torch
    from torch.utils import cpp_extension

    if not (torch._C.has_openmp and sys.platform.startswith("linux")):
        return ()
    # get_cxx_compiler ($CXX, else c++) compiles the C++ sources of the JIT build and of setup.py's build, which
    # torch's BuildExtension runs through ninja (a ninja-less build would compile with setuptools' CC instead).
    try:  # `c++ --version` names clang when it is clang; GCC says "(GCC)" or "Free Software Foundation"
        out = subprocess.run([cpp_extension.get_cxx_compiler(), "--version"], capture_output=True, text=True,
                             timeout=30).stdout
    except Exception:  # no compiler: the build itself reports that
        return ()
    out = out.lower()
    gcc = "clang" not in out and ("gcc" in out or "free software foundation" in out)
    return ("-fopenmp",) if gcc else ()


def cxx_flags() -> List[str]:
    return ["-O3", *openmp_flags()]


def ld_flags() -> List[str]:
    return list(openmp_flags())


CUDA_ARCHS = ("80", "90")
NVCC_FLAGS = ["-O3"]  # the JIT build targets this machine's GPU (or TORCH_CUDA_ARCH_LIST)
# Ahead-of-time builds: sm_80 and sm_90 code plus compute_90 PTX, which newer GPUs compile at load time.
GENCODE = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in CUDA_ARCHS] + [
    f"-gencode=arch=compute_{CUDA_ARCHS[-1]},code=compute_{CUDA_ARCHS[-1]}"]


def cuda_unavailable_reason() -> Optional[str]:
    """None when the CUDA sources can be built here, else why not."""
    import torch
    from torch.utils import cpp_extension

    if torch.version.cuda is None:
        return "this torch build has no CUDA"
    if cpp_extension.CUDA_HOME is None or not Path(cpp_extension.CUDA_HOME, "bin", "nvcc").exists():
        return "nvcc was not found (set CUDA_HOME)"
    return None


def sources(with_cuda: bool) -> List[str]:
    """Source paths relative to the repository root."""
    return CPU_SOURCES + (CUDA_SOURCES if with_cuda else [])


def extension():
    """(ext_modules, cmdclass) for setup.py: one module `mega_kernels._C`, CUDA sources when buildable."""
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    with_cuda = cuda_unavailable_reason() is None and os.environ.get("MEGA_KERNELS_BUILD_CUDA", "1") != "0"
    kind = CUDAExtension if with_cuda else CppExtension
    # TORCH_CUDA_ARCH_LIST, when set, picks the targets instead (torch drops it once a flag names an arch).
    gencode = [] if os.environ.get("TORCH_CUDA_ARCH_LIST") else GENCODE
    flags = {"cxx": cxx_flags(), "nvcc": NVCC_FLAGS + gencode} if with_cuda else {"cxx": cxx_flags()}
    ext = kind("mega_kernels._C", sources(with_cuda), extra_compile_args=flags, extra_link_args=ld_flags())
    return [ext], {"build_ext": BuildExtension}
