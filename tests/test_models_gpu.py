"""Model-level GPU checks that need no transformers: each GPU kernel backend against the reference backend,
under the tolerance rule of DESIGN.md (error against the float64 reference model within 3x the reference
backend's own error in the same dtype), for outputs and input gradients."""
import pytest
import torch

from helpers import assert_close_to_reference
from model_helpers import config_dict, gpu_backends, perturb_

from mega_kernels import MegaConfig, MegaModel


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, "autocast"], ids=str)
@pytest.mark.parametrize("overrides", [
    dict(use_chunking=True, chunk_size=16, attention_activation="softmax"),
    dict(is_decoder=True, bidirectional=False, attention_activation="laplace", truncation=20),
    dict(attention_activation="relu2", relative_positional_bias="simple", max_positions=64),
], ids=["chunk-softmax", "causal-laplace-trunc", "relu2-simple"])
def test_model_backends_on_gpu(dtype, overrides):
    """A 2-layer model on (B 2, L 50) with a left-padded row, through each GPU backend; "autocast": the float32
    model under torch.autocast (bfloat16), against the reference backend under the same autocast."""
    cfg = config_dict(hidden_size=64, shared_representation_size=32, intermediate_size=96, nffn_hidden_size=80,
                      ema_projection_size=8, **overrides)
    torch.manual_seed(0)
    base = MegaModel(MegaConfig(**cfg, kernel_backend="reference"))
    perturb_(base)
    state = base.state_dict()
    embeds = torch.randn(2, 50, 64, device="cuda")
    mask = torch.ones(2, 50, dtype=torch.bool, device="cuda")
    mask[1, :7] = False

    def run(backend, run_dtype):
        autocast = run_dtype == "autocast"
        run_dtype = torch.float32 if autocast else run_dtype
        model = MegaModel(MegaConfig(**cfg, kernel_backend=backend))
        model.load_state_dict(state)
        model = model.to("cuda", run_dtype).eval()
        x = embeds.to(run_dtype).requires_grad_(True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            out = model(inputs_embeds=x, attention_mask=mask, use_cache=False).last_hidden_state
        (grad,) = torch.autograd.grad((out.float() * embeds).sum(), x)
        return out[mask], grad[mask]

    ref64 = run("reference", torch.float64)
    ref_low = run("reference", dtype)
    for backend in gpu_backends():
        got = run(backend, dtype)
        for name, a, b, c in zip(("output", "input grad"), got, ref64, ref_low):
            assert_close_to_reference(f"{backend} {dtype} {name}", a, b, c)
