"""The 3D U-Net: shapes, odd sizes, initialisation, device/precision resolution, and that it learns."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from heartloop.contouring import network
from heartloop.contouring.loss import dice_score, masked_loss
from heartloop.contouring.network import (
    UNet3D,
    autocast,
    normalise_hu,
    preferred_memory_format,
    resolve_device,
    resolve_precision,
)
from heartloop.contouring.settings import ContouringSettings


@pytest.fixture(scope="module")
def small_net() -> UNet3D:
    torch.manual_seed(0)
    return UNet3D(width=8, depth=3, groups=4).eval()


def test_output_has_the_input_shape_one_logit_per_voxel(small_net):
    with torch.inference_mode():
        out = small_net(torch.randn(2, 1, 16, 24, 32))
    assert out.shape == (2, 1, 16, 24, 32)
    assert out.dtype == torch.float32


def test_odd_sizes_are_padded_and_cropped_back_in_place(small_net):
    x = torch.randn(1, 1, 13, 27, 30)
    with torch.inference_mode():
        out = small_net(x)
        # Same as padding by hand (edge-replicated, at the far end only) and cropping:
        # voxel (0, 0, 0) of the output belongs to voxel (0, 0, 0) of the input.
        padded = F.pad(x, (0, 2, 0, 5, 0, 3), mode="replicate")
        reference = small_net(padded)[:, :, :13, :27, :30]
    assert out.shape == (1, 1, 13, 27, 30)
    torch.testing.assert_close(out, reference)


def test_wrong_input_layout_is_refused(small_net):
    with pytest.raises(ValueError):
        small_net(torch.randn(1, 2, 8, 8, 8))
    with pytest.raises(ValueError):
        small_net(torch.randn(8, 8, 8))


def test_channels_last_gives_the_same_answer(small_net):
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.inference_mode():
        reference = small_net(x)
        cl_net = UNet3D(width=8, depth=3, groups=4)
        cl_net.load_state_dict(small_net.state_dict())
        cl_net = cl_net.eval().to(memory_format=torch.channels_last_3d)
        out = cl_net(x.contiguous(memory_format=torch.channels_last_3d))
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-4)


def test_kaiming_initialisation():
    torch.manual_seed(1)
    net = UNet3D(width=16, depth=2, groups=8)
    conv = net.encoders[0].conv1  # 32 → 32 channels, 3×3×3
    fan_out = conv.out_channels * 27
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2.0 / fan_out), rel=0.05)
    assert torch.all(net.encoders[0].norm1.weight == 1)


def test_from_settings_uses_width_depth_and_groups():
    net = UNet3D.from_settings(ContouringSettings(width=8, depth=2, groupnorm_groups=2))
    assert (net.width, net.depth, net.size_multiple) == (8, 2, 4)
    assert net.stem.norm1.num_groups == 2
    assert net.encoders[-1].conv1.out_channels == 32


def test_normalise_hu():
    out = normalise_hu(np.array([-3000, -1000, 0, 500, 1000, 3071], dtype=np.int16))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor([-1.0, -1.0, 0.0, 0.5, 1.0, 1.0]))


def test_resolve_device(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="no CUDA"):
        resolve_device("cuda")
    with pytest.raises(ValueError):
        resolve_device("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")


def test_resolve_precision_and_memory_format(monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) == torch.float32
    assert resolve_precision("bf16", cpu) == torch.bfloat16
    monkeypatch.setattr(network, "cpu_has_native_bf16", lambda: True)
    assert resolve_precision("auto", cpu) == torch.bfloat16
    monkeypatch.setattr(network, "cpu_has_native_bf16", lambda: False)
    assert resolve_precision("auto", cpu) == torch.float32
    with pytest.raises(ValueError):
        resolve_precision("fp16", cpu)
    assert preferred_memory_format(cpu, torch.float32, training=False) == torch.channels_last_3d
    assert preferred_memory_format(cpu, torch.bfloat16, training=True) == torch.contiguous_format
    assert preferred_memory_format(torch.device("cuda"), torch.float32, training=False) == torch.contiguous_format


def _blob_case(seed: int, n: int = 32) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A noisy ellipsoid 'organ' (60 HU) in soft tissue (-100 HU), sparsely painted."""
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[:n, :n, :n].astype(np.float64)
    centre = n / 2 + rng.uniform(-3, 3, size=3)
    distance = np.sqrt((z - centre[0]) ** 2 + ((y - centre[1]) * 1.2) ** 2 + (x - centre[2]) ** 2)
    blob = distance < 8.0
    hu = np.where(blob, 60.0, -100.0) + rng.normal(0.0, 40.0, size=blob.shape)
    painted = rng.random(blob.shape) < 0.3  # 30 % of voxels painted, scattered
    return hu, blob, blob & painted, ~blob & painted


def test_network_and_masked_loss_learn_a_blob_quickly():
    """A tiny end-to-end check that the pieces fit: sparse paint in, a whole organ out."""
    torch.manual_seed(0)
    settings = ContouringSettings()
    device = torch.device("cpu")
    dtype = resolve_precision(settings.precision, device)
    fmt = preferred_memory_format(device, dtype, training=True)
    cases = [_blob_case(seed) for seed in (1, 2)]  # batch of 2 also keeps fp32 on oneDNN
    x = torch.stack([normalise_hu(c[0]) for c in cases])[:, None].contiguous(memory_format=fmt)
    foreground = torch.from_numpy(np.stack([c[2] for c in cases]))
    background = torch.from_numpy(np.stack([c[3] for c in cases]))
    model = UNet3D.from_settings(settings).to(memory_format=fmt).train()
    optimiser = torch.optim.Adam(model.parameters(), lr=settings.learning_rate)
    started = time.perf_counter()
    for _ in range(50):
        optimiser.zero_grad(set_to_none=True)
        with autocast(device, dtype):
            logits = model(x)
        loss = masked_loss(logits, foreground, background)
        loss.backward()
        optimiser.step()
    elapsed = time.perf_counter() - started
    # Judge on an unseen blob, against the whole true organ (not just the painted voxels).
    hu, truth, _, _ = _blob_case(seed=3)
    with torch.inference_mode(), autocast(device, dtype):
        predicted = model.eval()(normalise_hu(hu)[None, None])[0, 0].float() > 0
    assert dice_score(predicted.numpy(), truth) > 0.9, f"loss {loss.item():.3f} after {elapsed:.1f} s"
