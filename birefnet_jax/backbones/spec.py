"""What a backbone family registers: its config class, module, presets, and how to recognise
and size it from an original state dict (timm keeps a model's checkpoint filter beside the model;
this is that, for BiRefNet's `bb.` keys)."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping

import numpy as np


@dataclasses.dataclass(frozen=True)
class DerivedBuffer:
    """A buffer the original saves that is a pure function of a parameter beside it, so it is no
    variable here: checked against that function when a state dict is read, recreated when one is
    written (Swin's `relative_position_index`, from its bias table)."""

    name: str  # the buffer's leaf key, e.g. "relative_position_index"
    source: str  # leaf key of the parameter in the same module, in the original's layout
    compute: Callable[[np.ndarray], np.ndarray]  # source value -> the buffer's value


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
    """One backbone family.

    kind: the `kind` field of its config (the key of the table).
    config: the frozen dataclass of its architecture.
    module: the NNX module built from that config; returns four feature maps (strides 4..32).
    presets: named configs, as the original names them (`config.bb`).
    key: a state-dict key (prefixes stripped) that only this family has.
    infer: state dict (+ overrides the weights cannot tell, e.g. `num_heads`) -> config.
    stagewise: the original runs it stage by stage, so its whole-backbone `add` multi-scale input
      cannot run with it.
    derived_buffers: buffers of the original's state dict that this family derives instead of storing.
    """

    kind: str
    config: type
    module: type
    presets: Mapping[str, object]
    key: str
    infer: Callable[..., object]
    stagewise: bool = False
    derived_buffers: tuple[DerivedBuffer, ...] = ()


def count_indices(keys, pattern: str) -> int:
    """1 + the largest integer captured by `pattern` among `keys` (0 if none): a layer count."""
    rx = re.compile(pattern)
    found = {int(m.group(1)) for k in keys if (m := rx.match(k))}
    return max(found) + 1 if found else 0


class ArchitectureError(ValueError):
    """The keys do not describe a BiRefNet this package can build."""


def shape_of(sd: Mapping[str, np.ndarray], key: str) -> tuple[int, ...]:
    """The shape of `sd[key]`, with an error that names the key the inference needed."""
    if key not in sd:
        raise ArchitectureError(f"the state dict lacks '{key}', which tells the architecture; the checkpoint "
                                "is incomplete or not a BiRefNet of this backbone")
    return tuple(sd[key].shape)
