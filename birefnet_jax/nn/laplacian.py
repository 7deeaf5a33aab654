"""The gradient map used as BiRefNet's target reference: a normalised 5x5 Laplacian of the
image's channel mean, with reflect padding (kornia's `laplacian(x, 5)`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def laplacian_kernel(size: int = 5, dtype=jnp.float32) -> jax.Array:
    """All-ones kernel with `1 - size**2` at the centre, divided by its absolute sum."""
    k = jnp.ones((size, size), dtype).at[size // 2, size // 2].set(1.0 - size * size)
    return k / jnp.sum(jnp.abs(k))


def gradient_map(images: jax.Array, size: int = 5) -> jax.Array:
    """(B, H, W, 3) normalised images -> (B, H, W, 1) Laplacian of their channel mean."""
    x = jnp.mean(images.astype(jnp.promote_types(images.dtype, jnp.float32)), axis=-1, keepdims=True)
    r = size // 2
    x = jnp.pad(x, ((0, 0), (r, r), (r, r), (0, 0)), mode="reflect")
    k = laplacian_kernel(size, x.dtype)[:, :, None, None]
    return jax.lax.conv_general_dilated(x, k, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
