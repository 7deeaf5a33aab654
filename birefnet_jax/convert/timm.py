"""Released backbone weights in timm's layout (today: DINOv3's `vit_*_patch16_dinov3`), loaded into
this package's backbone modules. The pure key filter lives beside the model
(`birefnet_jax.backbones.dinov3.timm_filter`); reading and strict filling happen here."""

from __future__ import annotations

from flax import nnx

from birefnet_jax.backbones.dinov3 import DinoV3, infer_config_timm, timm_filter
from birefnet_jax.convert.io import read_state_dict
from birefnet_jax.convert.keymap import ConversionError, load_state_dict_into
from birefnet_jax.nn.state import materialize_rng_state


def load_timm_state_dict(model: DinoV3, sd) -> DinoV3:
    """Fill `model` from a timm-layout DINOv3 state dict, strictly.

    Keys that `features_only` prunes are dropped (`timm_filter`); any other key must fill a parameter
    of the right shape, and every parameter must be filled, or `ConversionError` lists the missing,
    unexpected and mis-shaped keys. Returns the model (updated in place)."""
    try:
        load_state_dict_into(model.model, timm_filter(sd, model.cfg.num_blocks))
    except ConversionError as e:
        detail = str(e).partition("\n")[2]  # the lists, without the BiRefNet-specific advice
        raise ConversionError(f"the timm DINOv3 checkpoint does not fit {model.cfg} (weights of another "
                              f"architecture, or wrong num_heads / out_indices / depth overrides):\n{detail}") from None
    return model


def dinov3_from_timm(source, *, dtype=None, seed: int = 0, **overrides) -> DinoV3:
    """The DINOv3 backbone from released weights in timm's layout: a `.safetensors` / `.pth` path or
    a state dict. The architecture comes from the keys (presets get BiRefNet's out_indices;
    `overrides` as for `infer_config_timm`); dropout streams are seeded with `seed`."""
    sd = source if isinstance(source, dict) else read_state_dict(source)
    cfg = infer_config_timm(sd, **overrides)
    model = nnx.eval_shape(lambda: DinoV3(cfg, rngs=nnx.Rngs(0), dtype=dtype))
    load_timm_state_dict(model, sd)
    return materialize_rng_state(model, seed)
