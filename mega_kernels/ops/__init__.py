"""Functional ops with backend dispatch: `ema`, `ema_step`, `attention`."""
from .attention import attention
from .backends import BackendUnavailable, available_backends, resolve
from .ema import ema, ema_step

__all__ = ["attention", "ema", "ema_step", "BackendUnavailable", "available_backends", "resolve"]
