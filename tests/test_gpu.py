"""The CUDA path: tensors stay on the GPU until display, bf16/fp16 where asked. Runs only where
a CUDA GPU is present (skipped here otherwise)."""

from __future__ import annotations

import pytest
import torch

from model import load_checkpoint, load_image, prepare_image
from model.resources import EXAMPLES_DIR
from viz_app.pipeline import run_forward
from viz_app.results import analyze_image, gradient_map

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")]

IMAGE = EXAMPLES_DIR / "chelsea.jpg"


@pytest.mark.parametrize("dtype,tol", [("fp32", 1e-4), ("bf16", 2e-2), ("fp16", 1e-2)])
def test_cuda_keeps_tensors_on_device_and_matches_cpu(dtype, tol):
    cpu = load_checkpoint("demo", device="cpu", dtype="fp32")
    gpu = load_checkpoint("demo", device="cuda", dtype=dtype)
    assert gpu.device.type == "cuda" and next(gpu.model.parameters()).dtype == gpu.dtype
    prepared = prepare_image(load_image(IMAGE), cpu.preprocessing)
    x = prepared.pixels[None]
    fwd = run_forward(gpu.model, x.to("cuda", gpu.dtype))
    assert fwd.attentions.device.type == "cuda" and fwd.token_norms.device.type == "cuda"  # no trip to the host
    ref = run_forward(cpu.model, x)
    torch.testing.assert_close(fwd.attentions.cpu(), ref.attentions, atol=tol, rtol=0)
    result = analyze_image(gpu, prepared)  # results come to the host only for display
    assert result.rollout.shape == cpu.config.grid
    assert gradient_map(gpu, prepared, target=0).shape == cpu.config.grid
