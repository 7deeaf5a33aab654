"""Modulated deformable convolution against a direct per-position evaluation of its
definition, and against torchvision's `deform_conv2d` where torchvision is installed."""

import numpy as np
import pytest

from birefnet_jax.nn.deform_conv import deform_conv2d


def _bilinear_zero_outside(img, y, x):
    """img (H, W, C) sampled at (y, x); corners outside read as zero, nothing beyond one pixel."""
    h, w, _ = img.shape
    if y <= -1 or y >= h or x <= -1 or x >= w:
        return np.zeros(img.shape[-1])
    y0, x0 = int(np.floor(y)), int(np.floor(x))
    ly, lx = y - y0, x - x0
    out = np.zeros(img.shape[-1])
    for yy, xx, wgt in ((y0, x0, (1 - ly) * (1 - lx)), (y0, x0 + 1, (1 - ly) * lx),
                        (y0 + 1, x0, ly * (1 - lx)), (y0 + 1, x0 + 1, ly * lx)):
        if 0 <= yy < h and 0 <= xx < w:
            out += wgt * img[yy, xx]
    return out


def _direct(x, offset, mask, kernel, bias, stride, pad, dil):
    b, h, w, c = x.shape
    kh, kw, _, o = kernel.shape
    ho, wo = offset.shape[1:3]
    out = np.zeros((b, ho, wo, o))
    for n in range(b):
        for i in range(ho):
            for j in range(wo):
                for t in range(kh * kw):
                    ky, kx = divmod(t, kw)
                    y = i * stride - pad + ky * dil + offset[n, i, j, 2 * t]
                    xx = j * stride - pad + kx * dil + offset[n, i, j, 2 * t + 1]
                    v = _bilinear_zero_outside(x[n], y, xx) * mask[n, i, j, t]
                    out[n, i, j] += v @ kernel[ky, kx]
    return out + bias


@pytest.mark.parametrize("k,stride,pad,dil", [(3, 1, 1, 1), (1, 1, 0, 1), (3, 2, 2, 2)])
def test_matches_definition(k, stride, pad, dil):
    rng = np.random.default_rng(k + stride)
    b, h, w, c, o = 2, 5, 6, 3, 4
    ho = (h + 2 * pad - dil * (k - 1) - 1) // stride + 1
    wo = (w + 2 * pad - dil * (k - 1) - 1) // stride + 1
    x = rng.standard_normal((b, h, w, c))
    offset = rng.standard_normal((b, ho, wo, 2 * k * k)) * 2.5  # reaches beyond the border
    mask = rng.random((b, ho, wo, k * k)) * 2
    kernel = rng.standard_normal((k, k, c, o))
    bias = rng.standard_normal(o)
    got = deform_conv2d(*(a.astype(np.float32) for a in (x, offset, mask, kernel, bias)),
                        stride=stride, padding=pad, dilation=dil)
    ref = _direct(x, offset, mask, kernel, bias, stride, pad, dil)
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-4, atol=1e-4)


def test_zero_offsets_and_unit_mask_is_a_plain_convolution():
    import jax

    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 7, 7, 2)).astype(np.float32)
    kernel = rng.standard_normal((3, 3, 2, 3)).astype(np.float32)
    got = deform_conv2d(x, np.zeros((1, 7, 7, 18), np.float32), np.ones((1, 7, 7, 9), np.float32), kernel,
                        padding=1)
    ref = jax.lax.conv_general_dilated(x, kernel, (1, 1), [(1, 1), (1, 1)],
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_matches_torchvision():
    torch = pytest.importorskip("torch", reason="torch extra not installed")
    ops = pytest.importorskip("torchvision.ops", reason="torchvision not installed (optional cross-check)")
    rng = np.random.default_rng(0)
    for k, pad in ((1, 0), (3, 1), (7, 3)):
        x = rng.standard_normal((2, 8, 12, 10)).astype(np.float32)
        off = (rng.standard_normal((2, 2 * k * k, 12, 10)) * 3).astype(np.float32)
        m = (rng.random((2, k * k, 12, 10)) * 2).astype(np.float32)
        w = rng.standard_normal((5, 8, k, k)).astype(np.float32)
        ref = ops.deform_conv2d(*(torch.from_numpy(a) for a in (x, off, w)), padding=pad,
                                mask=torch.from_numpy(m)).numpy()
        got = deform_conv2d(x.transpose(0, 2, 3, 1), off.transpose(0, 2, 3, 1), m.transpose(0, 2, 3, 1),
                            w.transpose(2, 3, 1, 0), padding=pad)
        got = np.asarray(got).transpose(0, 3, 1, 2)
        assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 1e-6


def _previous_formulation(x, offset, mask, kernel, *, padding):
    """The formulation this module used before tiling (four gathered (B, Ho, Wo, K, C) corner
    tensors, then one contraction), kept as a second reference for values and gradients."""
    import jax.numpy as jnp

    b, h, w, c = x.shape
    kh, kw, _, o = kernel.shape
    k = kh * kw
    ho, wo = offset.shape[1:3]
    off = offset.reshape(b, ho, wo, k, 2)
    ky, kx = jnp.meshgrid(jnp.arange(kh), jnp.arange(kw), indexing="ij")
    py = (jnp.arange(ho) - padding)[:, None, None] + ky.reshape(-1)[None, None, :] + off[..., 0]
    px = (jnp.arange(wo) - padding)[None, :, None] + kx.reshape(-1)[None, None, :] + off[..., 1]
    inside = (py > -1) & (py < h) & (px > -1) & (px < w)
    y0, x0 = jnp.floor(py), jnp.floor(px)
    ly, lx = py - y0, px - x0
    y0, x0 = y0.astype(jnp.int32), x0.astype(jnp.int32)
    flat = x.reshape(b, h * w, c)

    def corner(yi, xi, wgt):
        valid = inside & (yi >= 0) & (yi < h) & (xi >= 0) & (xi < w)
        idx = jnp.clip(yi, 0, h - 1) * w + jnp.clip(xi, 0, w - 1)
        vals = jnp.take_along_axis(flat, idx.reshape(b, -1, 1), axis=1).reshape(b, ho, wo, k, c)
        return vals * jnp.where(valid, wgt, 0)[..., None]

    sampled = (corner(y0, x0, (1 - ly) * (1 - lx)) + corner(y0, x0 + 1, (1 - ly) * lx)
               + corner(y0 + 1, x0, ly * (1 - lx)) + corner(y0 + 1, x0 + 1, ly * lx))
    return jnp.einsum("bhwkc,kco->bhwo", sampled * mask[..., None], kernel.reshape(k, c, o))


def _grad_case(seed, k=3, b=2, h=6, w=7, c=3, o=4):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((b, h, w, c)), rng.standard_normal((b, h, w, 2 * k * k)) * 2.0,
            rng.random((b, h, w, k * k)) * 2, rng.standard_normal((k, k, c, o)))


@pytest.mark.parametrize("k", [pytest.param(1, marks=pytest.mark.slow), 3])
def test_gradient_matches_finite_differences(k):
    """Reverse-mode gradients with respect to input, offsets, mask and kernel, in float64, against
    central differences (random offsets stay clear of the integer kinks of bilinear sampling)."""
    import jax
    from jax.test_util import check_grads

    with jax.enable_x64(True):
        args = _grad_case(k, k=k)
        # Tiles of a few rows, so that gradients cross tile boundaries.
        f = lambda *a: deform_conv2d(*a, padding=k // 2, tile_bytes=40 * k * k * 3 * 8)  # noqa: E731
        check_grads(f, args, order=1, modes=["rev"], eps=1e-6, atol=1e-6, rtol=1e-6)


@pytest.mark.slow
def test_values_and_gradients_match_previous_formulation():
    import jax

    with jax.enable_x64(True):
        args = _grad_case(7, k=7, h=9, w=8, c=5, o=6)
        cot = np.random.default_rng(1).standard_normal((2, 9, 8, 6))

        def loss(fn):
            return lambda *a: (fn(*a) * cot).sum()

        new = lambda *a: deform_conv2d(*a, padding=3, tile_bytes=16 * 49 * 5 * 8)  # noqa: E731
        old = lambda *a: _previous_formulation(*a, padding=3)  # noqa: E731
        np.testing.assert_allclose(np.asarray(new(*args)), np.asarray(old(*args)), rtol=1e-12, atol=1e-12)
        got = jax.grad(loss(new), argnums=(0, 1, 2, 3))(*args)
        ref = jax.grad(loss(old), argnums=(0, 1, 2, 3))(*args)
        for name, g, r in zip(("input", "offset", "mask", "kernel"), got, ref, strict=True):
            np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-10, atol=1e-10, err_msg=name)


@pytest.mark.parametrize("k", [1, 3])
def test_layer_predicts_offsets_and_modulator_as_its_two_convolutions_would(k):
    """The layer runs its offset and modulator convolutions as one; in float64 that is the two
    convolutions to rounding."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from birefnet_jax.nn.deform_conv import DeformableConv2d

    with jax.enable_x64(True):
        layer = DeformableConv2d(4, 3, k, padding=k // 2, rngs=nnx.Rngs(0))
        rng = np.random.default_rng(k)
        for conv in (layer.offset_conv, layer.modulator_conv):
            conv.kernel.set_value(jnp.asarray(rng.standard_normal(conv.kernel.shape), jnp.float64))
            conv.bias.set_value(jnp.asarray(rng.standard_normal(conv.bias.shape), jnp.float64))
        x = jnp.asarray(rng.standard_normal((2, 7, 6, 4)))
        offset, modulator = layer.positions(x)
        np.testing.assert_allclose(offset, layer.offset_conv(x), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(modulator, 2 / (1 + np.exp(-np.asarray(layer.modulator_conv(x)))),
                                   rtol=1e-12, atol=1e-12)
