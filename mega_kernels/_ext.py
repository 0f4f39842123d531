"""Loads the compiled extension (csrc/). Placeholder until the C++ backend lands: never available."""
from __future__ import annotations

from typing import Optional

import torch


def unavailable_reason(device: torch.device) -> Optional[str]:
    return "the compiled extension is not built yet"
