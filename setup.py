"""Install mega-kernels.

`pip install -e .` installs the pure-Python package and never pulls a CUDA build of torch (install the torch
you want first; README). The compiled extension (csrc/) is JIT-built with ninja on first use; set
MEGA_KERNELS_BUILD_EXT=1 (with --no-build-isolation) to build it ahead of time instead.
"""
import os
import shutil

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py


class BuildPyWithSources(build_py):
    """Ship csrc/ inside the package (mega_kernels/_csrc_root/csrc) so that a non-editable install can still
    JIT-build the extension (mega_kernels/_build.py looks there when no csrc/ sits beside the package)."""

    def run(self):
        super().run()
        shutil.copytree("csrc", os.path.join(self.build_lib, "mega_kernels", "_csrc_root", "csrc"),
                        dirs_exist_ok=True)


def _ext_modules():
    if os.environ.get("MEGA_KERNELS_BUILD_EXT", "0") != "1":
        return [], {}
    from mega_kernels._build import extension  # needs torch in the build environment

    return extension()


ext_modules, cmdclass = _ext_modules()
cmdclass = {**cmdclass, "build_py": BuildPyWithSources}

setup(
    name="mega-kernels",
    version="0.1.0",
    description="Fast, faithful MEGA (Moving Average Equipped Gated Attention) kernels and models for PyTorch",
    long_description=open("README.md").read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["mega_kernels", "mega_kernels.*"]),
    python_requires=">=3.10",
    # torch is deliberately not pinned here beyond a floor that any installed torch satisfies, so pip never
    # replaces a CPU or preinstalled torch with a multi-GB CUDA download.
    install_requires=["torch>=2.4", "ninja"],
    extras_require={
        "triton": ["triton>=3.0"],
        "hub": ["huggingface_hub"],
        "test": ["pytest", "pytest-benchmark", "pytest-xdist", "transformers==4.57.6", "safetensors"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={"console_scripts": ["mega-kernels=mega_kernels.cli:main"]},
)
