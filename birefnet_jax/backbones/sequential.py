"""Building blocks for backbones taken from torchvision, whose state-dict keys are
`nn.Sequential` indices: an indexable container plus parameterless layers that hold the
indices where the original has an activation or a pooling layer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class Sequential(nnx.List):
    """Applies its entries in order. Entries may be `None`: a slice of a torchvision
    `nn.Sequential` keeps the parent's indices (VGG's second stage starts at index 10), so the
    indices before the slice are held by `None`, which keeps every key at its original number."""

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self:
            if layer is not None:
                x = layer(x)
        return x


class ReLU(nnx.Module):
    """Parameterless: only occupies the index of the original's ReLU."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.relu(x)


class MaxPool2d(nnx.Module):
    """Max pooling with PyTorch's semantics: padding counts as -inf, output size rounds down."""

    def __init__(self, kernel: int, stride: int, padding: int = 0):
        self.kernel, self.stride, self.padding = kernel, stride, padding

    def __call__(self, x: jax.Array) -> jax.Array:
        k, s, p = self.kernel, self.stride, self.padding
        return jax.lax.reduce_window(
            x, jnp.array(-jnp.inf, x.dtype), jax.lax.max,
            (1, k, k, 1), (1, s, s, 1), ((0, 0), (p, p), (p, p), (0, 0)))


class StagedBackbone(nnx.Module):
    """A backbone held as four stage modules `conv1..conv4` (the original's `bb.conv<i>`), run
    one after the other; returns every stage's output."""

    def __call__(self, x: jax.Array) -> tuple[jax.Array, ...]:
        outs = []
        for stage in (self.conv1, self.conv2, self.conv3, self.conv4):
            x = stage(x)
            outs.append(x)
        return tuple(outs)
