"""mega-kernels: fast, faithful MEGA (Moving Average Equipped Gated Attention) for PyTorch."""
__version__ = "0.1.0"

from . import ops  # noqa: E402

__all__ = ["ops", "__version__"]
