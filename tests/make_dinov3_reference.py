"""Generate `tests/reference/dinov3_<case>.json/.npz` (+ `_float64.npz`) and `dinov3_presets.json`:
reference data for the DINOv3 backbones, as the original BiRefNet builds them with timm
(`timm.create_model('vit_<size>_patch16_dinov3.lvd1689m', features_only=True,
dynamic_img_size=True, out_indices=...)`).

Needs timm (1.0.31 made the stored files) and torch, not the original checkout:

    /work/venv-orig/bin/python tests/make_dinov3_reference.py [--out tests/reference]

Each case is a real `vit_*_patch16_dinov3` model definition with its width, depth, heads and MLP
ratio shrunk (every other switch is the released model's), wrapped by timm's `features_only` as
the original does; weights are never stored, only a NumPy recipe per tensor (format in
`tests/reference/README.md`), for every key of the *whole* timm model (final norm and blocks that
`features_only` prunes included), so that tests can write both the BiRefNet-side `bb.model.*`
checkpoint and a released-weights-style timm checkpoint.

Outputs are computed in float64 and stored as float32 (`float32_error` in the JSON says how far
timm's own float32 run is); the `_float64.npz` keeps the float64 feature maps for the exactness
test. `dinov3_presets.json` holds timm's architecture and parameter count of the six real
presets, built on the meta device (no weights, no memory); `dinov3_rope.npz` rows of timm's
rotary tables for the real head widths at 1024x1024 and 2560x1440.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import timm
import torch

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "reference"
CONDITION_TOL = 3e-5  # timm's float32 run must be this close to its float64 run: the tests allow 1e-4

# The original's table (models/backbones/dino_v3.py), by BiRefNet backbone name.
PRESETS = {
    "dino_v3_s": ("vit_small_patch16_dinov3.lvd1689m", (3, 5, 7, 11)),
    "dino_v3_s_plus": ("vit_small_plus_patch16_dinov3.lvd1689m", (3, 5, 7, 11)),
    "dino_v3_b": ("vit_base_patch16_dinov3.lvd1689m", (3, 5, 7, 11)),
    "dino_v3_l": ("vit_large_patch16_dinov3.lvd1689m", (5, 11, 17, 23)),
    "dino_v3_h_plus": ("vit_huge_plus_patch16_dinov3.lvd1689m", (7, 15, 23, 31)),
    "dino_v3_7b": ("vit_7b_patch16_dinov3.lvd1689m", (9, 19, 29, 39)),
}

# Small cases: (timm model definition, size overrides, out_indices, input shapes NCHW).
CASES = {
    # S+/H+/7B switches: SwiGLU with aligned hidden width (int(48 * 2.9) = 139 -> 144), head dim 24;
    # depth 6 with out_indices up to 4, so features_only prunes the last block.
    "swiglu": ("vit_small_plus_patch16_dinov3", dict(embed_dim=48, depth=6, num_heads=2, mlp_ratio=2.9),
               (1, 2, 3, 4), ((1, 3, 64, 64), (1, 3, 48, 80))),
    # S/B/L switches: GELU MLP, head dim 16; four blocks before the first output, as S/B have.
    "mlp": ("vit_base_patch16_dinov3", dict(embed_dim=32, depth=8, num_heads=2), (3, 5, 6, 7),
            ((1, 3, 64, 64), (1, 3, 48, 80))),
    # The `_qkvb` definitions: q and v biases (k's stays zero, not a parameter).
    "qkvb": ("vit_small_patch16_dinov3_qkvb", dict(embed_dim=32, depth=5, num_heads=2), (0, 2, 3, 4),
             ((1, 3, 32, 48),)),
}


def relative_error(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def weight_range(key: str, shape: tuple) -> tuple[float, float]:
    """Uniform range per tensor: activations O(1), attention far from uniform, layer scale large
    enough (the released init of 1e-5 would make every block nearly the identity)."""
    leaf = key.rpartition(".")[2]
    if key in ("cls_token", "reg_token"):
        return -1.0, 1.0
    if leaf in ("gamma_1", "gamma_2"):
        return 0.3, 1.0
    if leaf in ("q_bias", "v_bias"):
        return -0.2, 0.2
    if ("norm" in key) and leaf == "weight":
        return 0.5, 1.5
    if leaf == "bias":
        return (-0.1, 0.1) if "norm" in key else (-0.02, 0.02)
    if leaf == "weight":
        fan_in = int(np.prod(shape[1:]))
        a = float(np.sqrt(6.0 / fan_in))
        return -a, a
    raise ValueError(f"no recipe rule for {key} {shape}")


def make_recipe(state_dict: dict[str, torch.Tensor], seed: int):
    master = np.random.Generator(np.random.PCG64(seed))
    weights, values = {}, {}
    for key, t in state_dict.items():
        shape = tuple(t.shape)
        low, high = weight_range(key, shape)
        s = int(master.integers(0, 2**32))
        weights[key] = {"seed": s, "low": low, "high": high, "shape": list(shape)}
        v = low + (high - low) * np.random.Generator(np.random.PCG64(s)).random(int(np.prod(shape)))
        values[key] = torch.from_numpy(v.astype(np.float32).reshape(shape))
    return weights, values


def describe(eva) -> dict:
    """The architecture switches of a timm Eva, read off the built modules."""
    blk = eva.blocks[0]
    mlp = blk.mlp
    swiglu = hasattr(mlp, "fc1_g")
    return {
        "embed_dim": eva.embed_dim,
        "num_heads": blk.attn.num_heads,
        "head_dim": blk.attn.head_dim,
        "blocks": len(eva.blocks),
        "swiglu": swiglu,
        "hidden_features": (mlp.fc1_g if swiglu else mlp.fc1).out_features,
        "num_reg_tokens": 0 if eva.reg_token is None else eva.reg_token.shape[1],
        "num_prefix_tokens": eva.num_prefix_tokens,
        "qkv_bias": blk.attn.q_bias is not None,
        "layer_scale": blk.gamma_1 is not None,
        "norm_eps": blk.norm1.eps,
        "patch_size": eva.patch_embed.patch_size[0],
        "rope_temperature": eva.rope.temperature,
        "rope_rotate_half": eva.rope.rotate_half,
        "rope_normalize_coords": eva.rope.normalize_coords,
        "final_norm": type(eva.norm).__name__,
    }


def presets() -> dict:
    out = {}
    for name, (model_name, out_indices) in PRESETS.items():
        with torch.device("meta"):
            full = timm.create_model(model_name)
            feats = timm.create_model(model_name, features_only=True, dynamic_img_size=True, out_indices=out_indices)
        out[name] = {
            "timm_name": model_name,
            "out_indices": list(out_indices),
            "depth": len(full.blocks),
            "params_features_only": sum(p.numel() for p in feats.parameters()),
            "params_full_model": sum(p.numel() for p in full.parameters()),
            "features_only": describe(feats.model),
            "state_dict_keys_features_only": len(feats.state_dict()),
            "full_model_extra_keys": sorted(set(full.state_dict()) - {k[len("model."):] for k in feats.state_dict()
                                                                      if k.startswith("model.")})[:8],
        }
        print(name, out[name]["params_features_only"], out[name]["features_only"])
    return out


# Rotary tables of the real head widths (64: S to H+, 128: 7B) on the token grids of 1024x1024 and
# 2560x1440 inputs, as timm computes them in float32 (some rows: whole tables would be megabytes).
ROPE_GRIDS = ((64, 64), (90, 160))
ROPE_ROWS = (0, 1, 2, 63, 64, 65, 127, 1000, 2047, 2080, 4095)


def rope_samples() -> dict[str, np.ndarray]:
    from timm.layers.pos_embed_sincos import RotaryEmbeddingDinoV3

    out = {}
    for head_dim in (64, 128):
        rope = RotaryEmbeddingDinoV3(dim=head_dim, temperature=100.0, rotate_half=True)
        out[f"head{head_dim}/periods"] = rope.periods.numpy()
        for h, w in ROPE_GRIDS:
            table = rope.get_embed(shape=[h, w])
            assert table.dtype == torch.float32 and table.shape == (h * w, 2 * head_dim)
            rows = [r for r in ROPE_ROWS if r < h * w] + [h * w - 1]
            out[f"head{head_dim}/grid{h}x{w}/rows"] = np.array(rows)
            out[f"head{head_dim}/grid{h}x{w}/table"] = table[rows].numpy()
    return out


def run(feats, x: np.ndarray, dtype) -> dict[str, torch.Tensor]:
    """timm's features_only forward plus the intermediates on the way."""
    eva = feats.model
    feats.to(dtype)
    xt = torch.from_numpy(x).to(dtype)
    h, w = x.shape[2] // 16, x.shape[3] // 16
    res = {}
    pe = eva.patch_embed(xt)  # (B, h, w, C): dynamic_img_size keeps it NHWC
    res["patch_embed"] = pe
    tokens, rope = eva._pos_embed(pe)
    res["tokens"], res["rope"] = tokens, rope
    res["block0"] = eva.blocks[0](eva.norm_pre(tokens), rope=rope)
    for i, f in enumerate(feats(xt)):
        res[f"features{i + 1}"] = f
    assert res["features1"].shape[2:] == (h, w)
    return res


def generate(case: str, seed: int, out_dir: Path) -> None:
    model_name, sizes, out_indices, shapes = CASES[case]
    torch.manual_seed(0)
    full = timm.create_model(model_name, **sizes)
    feats = timm.create_model(model_name, features_only=True, dynamic_img_size=True, out_indices=out_indices, **sizes)
    feats.eval()
    full_sd = full.state_dict()
    weights, values = make_recipe(full_sd, seed)
    feat_keys = list(feats.state_dict())
    assert all(k.startswith("model.") and k[len("model."):] in values for k in feat_keys)
    feats.load_state_dict({k: values[k[len("model."):]] for k in feat_keys}, strict=True)
    rng = np.random.Generator(np.random.PCG64(seed + 1))
    arrays, arrays64, f32_err = {}, {}, {}
    periods = feats.model.rope.periods.clone()
    arrays["rope_periods"] = periods.numpy()
    for i, shape in enumerate(shapes):
        x = rng.standard_normal(shape).astype(np.float32)
        arrays[f"input{i}"] = x
        out32 = run(feats, x, torch.float32)
        out64 = run(feats, x, torch.float64)  # float64 last: the model is left in float64
        for k, v in out64.items():
            err = relative_error(out32[k].numpy(), v.numpy())
            f32_err[f"input{i}/{k}"] = err
            if not err < CONDITION_TOL:
                raise RuntimeError(f"ill-conditioned reference {case}/input{i}/{k}: float32 is {err:.2e} from "
                                   "float64; change the weight ranges")
            arrays[f"input{i}/{k}"] = v.numpy().astype(np.float32)
            if k.startswith("features"):
                arrays64[f"input{i}/{k}"] = v.numpy()
    # periods are built in float32 and only cast by .double(): the float64 run uses the same values
    assert torch.equal(feats.model.rope.periods.float(), periods)
    eva = feats.model
    meta = {
        "case": case,
        "seed": seed,
        "timm_model": model_name,
        "timm_kwargs": {**sizes, "features_only": True, "dynamic_img_size": True, "out_indices": list(out_indices)},
        "generator": {"torch": torch.__version__, "timm": timm.__version__,
                      "computed_in": "float64, stored as float32"},
        "architecture": describe(eva) | {"depth": len(full.blocks), "out_indices": list(out_indices)},
        "inputs": {f"input{i}": list(s) for i, s in enumerate(shapes)},
        # The BiRefNet-side keys (`bb.` + timm features_only's `model.` + the Eva's keys) ...
        "state_dict_keys": ["bb." + k for k in feat_keys],
        # ... and the whole timm model's, as released weights have them; recipes are keyed by these.
        "timm_state_dict_keys": list(full_sd),
        "weights": weights,
        "params_features_only": sum(p.numel() for p in feats.parameters()),
        "float32_error": f32_err,
    }
    (out_dir / f"dinov3_{case}.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
    np.savez_compressed(out_dir / f"dinov3_{case}.npz", **arrays)
    np.savez_compressed(out_dir / f"dinov3_{case}_float64.npz", **arrays64)
    sizes_kb = [(out_dir / f"dinov3_{case}{s}").stat().st_size / 1e3 for s in (".json", ".npz", "_float64.npz")]
    print(f"{case}: worst float32 vs float64 {max(f32_err.values()):.1e}; {len(feat_keys)} keys "
          f"({len(full_sd)} in the whole model); json/npz/npz64 " + "/".join(f"{k:.0f}" for k in sizes_kb) + " kB")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=OUT, help="output folder (default: tests/reference)")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    for i, case in enumerate(CASES):
        generate(case, seed=3000 + i, out_dir=args.out)
    np.savez_compressed(args.out / "dinov3_rope.npz", **rope_samples())
    (args.out / "dinov3_presets.json").write_text(json.dumps(
        {"generator": {"torch": torch.__version__, "timm": timm.__version__}, "presets": presets()},
        indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
