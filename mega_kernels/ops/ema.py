"""Functional EMA op with backend dispatch (contract: DESIGN.md "Functional contracts").

    ema(x, delta, alpha, beta, gamma, omega, *, mask=None, bidirectional=False, truncation=None,
        state=None, return_state=False, backend="auto")  -> y (B, L, D) [, state (B, D, N) float32, float64 for
        float64 x]
    ema_step(x, delta, alpha, beta, gamma, omega, state, *, mask=None, backend="auto") -> (y (B, D), state)

The module parameters are turned into the recurrence coefficients (a, q, c) of
`mega_kernels.reference.ema.ema_coefficients` here, in plain differentiable PyTorch on (kd, N) tensors, so
every kernel works on (a, q, c) and returns their gradients; autograd carries them back to the parameters.

Compiled and Triton backends expose two torch.library ops with one schema each
(see `EMA_FWD_SCHEMA` / `EMA_BWD_SCHEMA`) and `register_ema_autograd` ties any such pair into one
differentiable op, so all kernel backends share a single autograd definition.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ..reference.ema import ema_coefficients, ema_fft
from ..reference.ema import ema_step as reference_step
from . import backends
from .autograd import reference_grads

Tensor = torch.Tensor

# Schemas every kernel backend implements (truncation 0 = none; final_state is empty unless return_state;
# grad_state is empty unless a state was given). a, q, c are (kd, N) float32, omega (D,) float32.
EMA_FWD_SCHEMA = ("(Tensor x, Tensor a, Tensor q, Tensor c, Tensor omega, Tensor? mask, Tensor? state, "
                  "bool bidirectional, int truncation, bool return_state) -> (Tensor, Tensor)")
EMA_BWD_SCHEMA = ("(Tensor grad_y, Tensor? grad_state, Tensor x, Tensor a, Tensor q, Tensor c, Tensor omega, "
                  "Tensor? mask, Tensor? state, bool bidirectional, int truncation) "
                  "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")
# A backend may save work for its backward: its forward returns a third tensor (empty when there is nothing to
# save) and its backward takes it last (the Triton backend's chunk states).
EMA_FWD_SAVING_SCHEMA = EMA_FWD_SCHEMA.replace("-> (Tensor, Tensor)", "-> (Tensor, Tensor, Tensor)")
EMA_BWD_SAVED_SCHEMA = EMA_BWD_SCHEMA.replace("int truncation)", "int truncation, Tensor? saved=None)")
EMA_STEP_SCHEMA = ("(Tensor x, Tensor a, Tensor q, Tensor c, Tensor omega, Tensor state, Tensor? mask) "
                   "-> (Tensor, Tensor)")

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# The CUDA kernels keep N states per thread in registers (cuda::kMaxN in csrc/ema/ema_cuda.h): they refuse a
# larger N, and auto then takes the reference.
CUDA_MAX_N = 32


def register_ema_autograd(fwd_op, bwd_op, saves: bool = False) -> Callable:
    """Make `fwd_op` differentiable with `bwd_op`; return a callable with the backend signature
    `(x, a, q, c, omega, *, mask, bidirectional, truncation, state, return_state)`. saves: the pair has the
    EMA_FWD_SAVING_SCHEMA / EMA_BWD_SAVED_SCHEMA schemas (the forward's third output goes to the backward).
    A backward under create_graph=True differentiates the reference (`ema_fft`) instead of calling `bwd_op`,
    so double backward is right on every backend (ops/autograd.py)."""

    def setup_context(ctx, inputs, output):
        x, a, q, c, omega, mask, state, bidirectional, truncation, return_state = inputs
        ctx.save_for_backward(x, a, q, c, omega, mask, state, output[2] if saves else None)
        ctx.flags = (bidirectional, truncation, return_state)
        if saves:
            ctx.mark_non_differentiable(output[2])
        # An output without a gradient reaches backward as None, not as zeros autograd would allocate (the saved
        # chunk states' zeros alone are B * D * N * L / chunk floats, alive at the backward's peak).
        ctx.set_materialize_grads(False)

    def backward(ctx, grad_y, grad_state, *_):
        x, a, q, c, omega, mask, state, saved = ctx.saved_tensors
        bidirectional, truncation, return_state = ctx.flags
        gs = grad_state if return_state else None
        if grad_y is None:  # a loss on the final state alone
            grad_y = torch.zeros_like(x)
        if torch.is_grad_enabled():  # create_graph=True: differentiable gradients (ops/autograd.py)
            def recompute(x, a, q, c, omega, state):
                out = ema_fft(x, a, q, c, omega, mask=mask, bidirectional=bidirectional,
                              truncation=truncation or None, state=state, return_state=return_state)
                return out if return_state else (out, None)

            needs = [ctx.needs_input_grad[i] for i in (0, 1, 2, 3, 4, 6)]
            gx, ga, gq, gc, gomega, gstate = reference_grads(recompute, (x, a, q, c, omega, state), needs,
                                                             (grad_y, gs))
            return gx, ga, gq, gc, gomega, None, gstate, None, None, None
        args = (grad_y.contiguous(), None if gs is None else gs.contiguous(), x, a, q, c, omega, mask, state,
                bidirectional, truncation) + ((saved,) if saves else ())
        gx, ga, gq, gc, gomega, gstate = bwd_op(*args)
        return gx, ga, gq, gc, gomega, None, (gstate if state is not None else None), None, None, None

    torch.library.register_autograd(fwd_op, backward, setup_context=setup_context)

    def run(x, a, q, c, omega, *, mask=None, bidirectional=False, truncation=None, state=None,
            return_state=False):
        dt = torch.float64 if x.dtype == torch.float64 else torch.float32  # float64 stays (cpu backend)
        y, final, *_ = fwd_op(x.contiguous(), a.to(dt).contiguous(), q.to(dt).contiguous(),
                              c.to(dt).contiguous(), omega.to(dt).contiguous(),
                              None if mask is None else mask.to(torch.bool).contiguous(),
                              None if state is None else state.to(dt).contiguous(),
                              bidirectional, truncation or 0, return_state)
        return (y, final) if return_state else y

    return run


def register_ema_step_autograd(step_op) -> None:
    """Make a kernel's decoding step `step_op` (EMA_STEP_SCHEMA) differentiable in x, a, q, c, omega and state.
    Its backward recomputes the step with the reference (`reference.ema.ema_step`, plain PyTorch on (B, D, N)
    tensors: the cost of the step itself) and differentiates that, so every backend has the reference's
    gradients without a second copy of the maths."""

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def backward(ctx, grad_y, grad_state):
        *tensors, mask = ctx.saved_tensors
        return reference_grads(lambda *t: reference_step(*t, mask), tensors, ctx.needs_input_grad[:6],
                               (grad_y, grad_state)) + (None,)

    torch.library.register_autograd(step_op, backward, setup_context=setup_context)


def _bool_mask(mask: Optional[Tensor]) -> Optional[Tensor]:
    """Any nonzero entry is a token: every backend sees the same boolean mask."""
    return mask if mask is None or mask.dtype == torch.bool else mask != 0


def _validate(x, delta, alpha, beta, gamma, omega, mask, bidirectional, truncation, state, return_state,
              fn="ema"):
    if not isinstance(x, Tensor) or x.dim() != 3:
        raise ValueError(f"{fn}: x must be a (B, L, D) tensor, got {getattr(x, 'shape', type(x))}")
    if x.dtype not in _FLOATS:
        raise TypeError(f"{fn}: x must be float16, bfloat16, float32 or float64, got {x.dtype}")
    for name, flag in (("bidirectional", bidirectional), ("return_state", return_state)):
        if not isinstance(flag, bool):
            raise TypeError(f"{fn}: {name} must be True or False, got {flag!r}")
    for name, p in (("delta", delta), ("alpha", alpha), ("beta", beta), ("gamma", gamma), ("omega", omega),
                    ("mask", mask), ("state", state)):
        if (p is not None or name not in ("mask", "state")) and not isinstance(p, Tensor):
            raise TypeError(f"{fn}: {name} must be a tensor, got {type(p).__name__}")
    bsz, length, dim = x.shape
    kd = 2 * dim if bidirectional else dim
    if gamma.dim() != 2 or gamma.shape[0] != kd:
        raise ValueError(f"{fn}: gamma must be ({kd}, N) for D={dim}, bidirectional={bidirectional}; "
                         f"got {tuple(gamma.shape)}")
    ndim = gamma.shape[1]
    if ndim < 1:
        raise ValueError(f"{fn}: gamma must be (kd, N) with an expansion size N >= 1, got N = 0")
    for name, p in (("delta", delta), ("alpha", alpha), ("beta", beta)):
        if tuple(p.shape) != (kd, ndim, 1):
            raise ValueError(f"{fn}: {name} must be ({kd}, {ndim}, 1), got {tuple(p.shape)}")
    if tuple(omega.shape) != (dim,):
        raise ValueError(f"{fn}: omega must be ({dim},), got {tuple(omega.shape)}")
    for name, p in (("delta", delta), ("alpha", alpha), ("beta", beta), ("gamma", gamma), ("omega", omega)):
        if p.device != x.device:
            raise ValueError(f"{fn}: {name} is on {p.device} but x is on {x.device}; move both to one device")
        if not p.dtype.is_floating_point:
            raise TypeError(f"{fn}: {name} must be a floating tensor, got {p.dtype}")
    if mask is not None:
        if tuple(mask.shape) != (bsz, length):
            raise ValueError(f"{fn}: mask must be (B, L) = ({bsz}, {length}), got {tuple(mask.shape)}")
        if mask.device != x.device:
            raise ValueError(f"{fn}: mask is on {mask.device} but x is on {x.device}")
    if truncation is not None and (not isinstance(truncation, int) or isinstance(truncation, bool) or truncation < 1):
        raise ValueError(f"{fn}: truncation must be a positive int or None, got {truncation!r}")
    if (state is not None or return_state) and bidirectional:
        raise ValueError(f"{fn}: a state (state= or return_state=True) exists only for a unidirectional EMA; "
                         "pass bidirectional=False or drop the state arguments")
    if (state is not None or return_state) and truncation is not None:
        # (even with truncation >= L: a state may stand for any number of earlier inputs, and continuing from one
        # would not drop them, so the result would silently not be the truncated EMA)
        raise ValueError(f"{fn}: a truncated EMA has no finite recurrent state; drop truncation= or keep the last "
                         "`truncation` inputs and recompute (the models do this for cached decoding)")
    if state is not None:
        if tuple(state.shape) != (bsz, dim, ndim):
            raise ValueError(f"{fn}: state must be (B, D, N) = ({bsz}, {dim}, {ndim}), got {tuple(state.shape)}")
        if state.device != x.device:
            raise ValueError(f"{fn}: state is on {state.device} but x is on {x.device}; move both to one device")
        if not state.dtype.is_floating_point:
            raise TypeError(f"{fn}: state must be a floating tensor, got {state.dtype}")


# The GPU kernels' truncated EMA subtracts the tap leaving the window from a running state, and the rounding
# each subtraction leaves decays only as q^t: where 1 - q << 1 / K their errors grow to far beyond the
# reference's (a float32 d alpha off by 1e-4 .. 1e-2; the cpu kernels anchor the state every K steps and are
# exact, ema_kernels.cuh "Anchoring"). Until the GPU kernels anchor too, auto runs truncated calls there on the
# reference, and an explicit request warns once.
GPU_TRUNCATION_NOTE = ("a truncated EMA loses precision on the {} kernels where 1 - q << 1 / truncation (slow "
                       "decays); the reference is exact there (README, known limits)")


def _resolve(backend, x, gamma, truncation=None) -> str:
    name = backends.resolve("ema", backend, x.device, x.dtype)
    auto = backends.is_auto("ema", backend)
    if name == "cuda" and auto and gamma.shape[1] > CUDA_MAX_N:
        # (auto tries triton before cuda: it is unavailable here)
        backends.note_fallback("ema", x.device, f"cuda: N = {gamma.shape[1]} > {CUDA_MAX_N}")
        return "reference"
    if name in ("triton", "cuda") and truncation is not None:
        if auto:
            backends.note_fallback("ema", x.device, GPU_TRUNCATION_NOTE.format(name))
            return "reference"
        backends.warn_once(("ema", name, "truncation"),
                           f"mega_kernels: ema: backend={name!r}: " + GPU_TRUNCATION_NOTE.format(name))
    return name


def ema(x: Tensor, delta: Tensor, alpha: Tensor, beta: Tensor, gamma: Tensor, omega: Tensor, *,
        mask: Optional[Tensor] = None, bidirectional: bool = False, truncation: Optional[int] = None,
        state: Optional[Tensor] = None, return_state: bool = False, backend: Optional[str] = "auto"):
    """silu(EMA(x * mask) + omega * x): x (B, L, D) -> (B, L, D) in x's dtype [, final state (B, D, N)].

    delta, alpha, beta (kd, N, 1), gamma (kd, N), omega (D,) as `MegaMultiDimensionDampedEma` holds them
    (kd = 2D when bidirectional). mask (B, L), True/1 = token. state (B, D, N) continues a previous call.
    torch.autocast changes nothing: the sums are float32 (float64 for float64 x) and y is in x's dtype.
    """
    if backends.autocast_dtype(x) is not None:
        with torch.autocast(x.device.type, enabled=False):
            return ema(x, delta, alpha, beta, gamma, omega, mask=mask, bidirectional=bidirectional,
                       truncation=truncation, state=state, return_state=return_state, backend=backend)
    _validate(x, delta, alpha, beta, gamma, omega, mask, bidirectional, truncation, state, return_state)
    mask = _bool_mask(mask)
    if truncation is not None and truncation >= x.shape[1]:
        truncation = None  # K >= L taps: the plain EMA
    name = _resolve(backend, x, gamma, truncation)
    a, q, c = ema_coefficients(delta, alpha, beta, gamma)
    impl = backends.implementation("ema", name)
    return impl(x, a, q, c, omega, mask=mask, bidirectional=bidirectional, truncation=truncation, state=state,
                return_state=return_state)


def ema_step(x: Tensor, delta: Tensor, alpha: Tensor, beta: Tensor, gamma: Tensor, omega: Tensor,
             state: Tensor, *, mask: Optional[Tensor] = None, backend: Optional[str] = "auto"):
    """One decoding step of a unidirectional EMA: x (B, D), state (B, D, N) -> (y (B, D), new state (B, D, N);
    float32, float64 for float64 x).

    mask (B,) True = token; a padded token leaves the state decaying without input. As `ema`, unchanged by autocast.
    Differentiable in x, the parameters and state on every backend (`register_ema_step_autograd`).
    """
    if backends.autocast_dtype(x) is not None:
        with torch.autocast(x.device.type, enabled=False):
            return ema_step(x, delta, alpha, beta, gamma, omega, state, mask=mask, backend=backend)
    if not isinstance(x, Tensor) or x.dim() != 2:
        raise ValueError(f"ema_step: x must be a (B, D) tensor, got {getattr(x, 'shape', type(x))}")
    if not isinstance(state, Tensor):
        raise TypeError(f"ema_step: state must be the (B, D, N) state of the previous step (zeros to start), got "
                        f"{type(state).__name__}")
    if mask is not None and (not isinstance(mask, Tensor) or tuple(mask.shape) != (x.shape[0],)):
        raise ValueError(f"ema_step: mask must be (B,) = ({x.shape[0]},), one entry per row of x, got "
                         f"{tuple(getattr(mask, 'shape', ()))}")
    _validate(x[:, None], delta, alpha, beta, gamma, omega, None if mask is None else mask[:, None], False, None,
              state, True, fn="ema_step")
    mask = _bool_mask(mask)
    name = _resolve(backend, x, gamma)
    a, q, c = ema_coefficients(delta, alpha, beta, gamma)
    impl = backends.implementation("ema_step", name)
    return impl(x, a, q, c, omega, state, mask)


for _op, _attr in (("ema", "ema"), ("ema_step", "ema_step")):
    backends.register(_op, "reference", "mega_kernels.reference.ema", "ema_fft" if _op == "ema" else "ema_step",
                      backends.probe_reference)
    backends.register(_op, "triton", "mega_kernels.ops.ema_triton", _attr, backends.probe_triton)
    backends.register(_op, "cpu", "mega_kernels.ops.ema_ext", _attr, backends.probe_extension_cpu)
    backends.register(_op, "cuda", "mega_kernels.ops.ema_ext", _attr, backends.probe_extension_cuda)
