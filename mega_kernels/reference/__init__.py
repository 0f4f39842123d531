"""The MEGA spec in plain PyTorch, one file per op; every test and benchmark imports these."""
from .attention import attention, attention_weights
from .ema import ema_coefficients, ema_fft, ema_kernel, ema_recurrent, ema_step

__all__ = ["attention", "attention_weights", "ema_coefficients", "ema_fft", "ema_kernel", "ema_recurrent",
           "ema_step"]
