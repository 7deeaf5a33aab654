"""Generate `tests/reference/model_dinov3.json/.npz`: the original BiRefNet around a tiny DINOv3
backbone (the original's `dino_v3_*` path: timm's `vit_*_patch16_dinov3` with `features_only`,
pyramid neck in the decoder, frozen backbone), with random weights.

Needs a checkout of the original (github.com/ZhengPeng7/BiRefNet) and an environment with torch,
torchvision, timm (>= 1.0.20, which has the DINOv3 models), kornia, einops, huggingface_hub and
OpenCV; run from the repository root:

    python tests/make_dinov3_model_reference.py [--original .orig/BiRefNet]

The backbone is timm's `vit_small_patch16_dinov3` definition with its widths shrunk (TINY: embed
32, 2 heads, depth 4, all four blocks' outputs), built exactly as the original's `dino_v3_s`
builds the full one (`features_only=True, dynamic_img_size=True, out_indices=...`). The rest is
the original's released default decoder (multi-scale input `cat`, context 3, `BasicDecBlk_x1`
squeeze, `ASPPDeformable`, patch-split image input, gradient attention, BatchNorm), with the
auxiliary classification head on so that training mode exercises it, and the original's own
switches for a `dino` backbone name: `use_pyramid_neck` and `freeze_bb`.

Weights are stored as the NumPy recipe of tests/reference/README.md. Every stored result is
computed in float64 and stored as float32 (`float32_error` in the JSON records how far the
original's own float32 run is, below CONDITION_TOL); the final eval logits are also stored in
float64 (`float64/output<i>`).

npz (NCHW, as PyTorch produced them):
- `input<i>` (1x3x64x64 and the non-square 1x3x64x96), `output<i>`: eval-mode logits.
- `input<i>/backbone1..4`: the backbone's outputs for the full-size input (all at stride 16).
- `input<i>/encoder1..4`: after the `cat` of the half-size pass, context concatenated into level 4.
- `input<i>/squeeze`, `input<i>/pyramid_neck_x1..4` (the neck's outputs, at strides 4..32),
  `input<i>/decoder_block4..1`; of these last two, only every (C // 16)-th channel (16 of C).
- `train/input` (4x3x64x64): one training-mode forward (BatchNorm on batch statistics, ASPP dropout
  set to 0): `train/pred0..3`, `train/gdt_pred0..2`, `train/gdt_label0`, `train/cls` (the
  auxiliary class logits). The backbone is frozen as the original configures it: after a backward
  pass of a loss on every output, the JSON's `frozen_backbone_has_grad` says whether any backbone
  parameter received a gradient (it must not).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "reference"
sys.path.insert(0, str(ROOT / "tests"))
from make_cnn_reference import image_like, make_recipe, relative_error, weight_range  # noqa: E402

TIMM_MODEL = "vit_small_patch16_dinov3"  # the original's dino_v3_s; shrunk by TINY
ORIGINAL_NAME = "dino_v3_s"  # `config.bb`: what switches the original's neck and freezing on
TINY = {"embed_dim": 32, "num_heads": 2, "depth": 4}
OUT_INDICES = (0, 1, 2, 3)
INPUT_SHAPES = ((1, 3, 64, 64), (1, 3, 64, 96))
TRAIN_SHAPE = (4, 3, 64, 64)
CONDITION_TOL = 3e-5
SEED = 2000
# The neck and decoder outputs are wide (the neck's widths are Swin-L's whatever the backbone): of
# those, every (C // KEPT_CHANNELS)-th channel is stored, so that the files stay small.
KEPT_CHANNELS = 16
THINNED = ("pyramid_neck_x", "decoder_block")
FLOAT32_ERROR: dict[str, float] = {}
BB_GRADS: list[int] = []  # per training run: how many backbone parameters received a gradient


def train_loss(preds, gdt_preds, cls_logits):
    """A scalar of every training output, to see where gradients go."""
    loss = sum((p**2).mean() for p in preds) + sum((g**2).mean() for g in gdt_preds)
    return loss + (cls_logits**2).mean()


def dino_weight_range(key: str, shape: tuple, keys: set) -> tuple[float, float] | None:
    """Uniform ranges for the ViT's tensors (tokens, layer scales, LayerNorms); the rest as the
    CNN references (He-uniform convs and linears, BatchNorm statistics, deformable offsets)."""
    leaf = key.rpartition(".")[2]
    if key.startswith("bb."):
        if leaf in ("cls_token", "reg_token"):
            return -1.0, 1.0
        if leaf.startswith("gamma_"):
            return 0.2, 0.6  # layer scale: every block visible in the output, none dominating
        if ".norm" in key or key.startswith("bb.model.norm"):
            return (0.6, 1.4) if leaf == "weight" else (-0.2, 0.2)
        if leaf == "bias":
            return -0.1, 0.1
    return weight_range(key, shape, keys)


# What the patched original Config says: the backbone name, its width, the classification head.
SETTINGS = {"bb": ORIGINAL_NAME, "width": TINY["embed_dim"], "auxiliary_classification": True}
# The original's DINOv3 names (its config.py), for the real-size parameter counts.
REAL_NAMES = ("dino_v3_s", "dino_v3_s_plus", "dino_v3_b", "dino_v3_l", "dino_v3_h_plus", "dino_v3_7b")


def import_original(orig_dir: Path):
    """The original's `models.birefnet`, with its Config patched after its own __init__ (which derives
    the widths and `freeze_bb` from the backbone name it hard-codes) to follow SETTINGS."""
    if str(orig_dir) not in sys.path:
        sys.path.insert(0, str(orig_dir))
    import config as orig_config

    unpatched = orig_config.Config.__init__
    if getattr(unpatched, "follows_settings", False):
        import models.birefnet as birefnet

        return birefnet, orig_config

    def patched(self):
        unpatched(self)
        self.bb = SETTINGS["bb"]
        self.freeze_bb = "dino_v3" in self.bb
        self.auxiliary_classification = SETTINGS["auxiliary_classification"]
        lat = [SETTINGS["width"]] * 4
        self.lateral_channels_in_collection = [c * 2 for c in lat] if self.mul_scl_ipt == "cat" else lat
        self.cxt = self.lateral_channels_in_collection[1:][::-1][-self.cxt_num:] if self.cxt_num else []

    patched.follows_settings = True
    orig_config.Config.__init__ = patched
    import models.birefnet as birefnet

    return birefnet, orig_config


def build_original(orig_dir: Path):
    """The original BiRefNet for `config.bb = dino_v3_s` with the tiny backbone."""
    import timm

    birefnet, orig_config = import_original(orig_dir)

    def tiny_dino(*args, **kwargs):
        return timm.create_model(TIMM_MODEL, pretrained=False, features_only=True, dynamic_img_size=True,
                                 out_indices=OUT_INDICES, **TINY)

    real_builder = birefnet.build_backbone
    birefnet.build_backbone = tiny_dino
    try:
        net = birefnet.BiRefNet(bb_pretrained=False)
    finally:
        birefnet.build_backbone = real_builder
    cfg = vars(orig_config.Config())
    assert net.decoder.use_pyramid_neck and cfg["freeze_bb"]
    assert not any(p.requires_grad for k, p in net.named_parameters() if k.startswith("bb."))
    return net, cfg, timm.__version__


def real_size_parameter_counts(orig_dir: Path) -> dict[str, int]:
    """Parameters of the original BiRefNet (released default decoder, no classification head) around
    each real DINOv3, built on PyTorch's meta device (shapes only)."""
    import timm

    birefnet, _ = import_original(orig_dir)
    counts = {}
    saved = dict(SETTINGS)
    try:
        for name in REAL_NAMES:
            with torch.device("meta"):
                width = birefnet.build_backbone(name, pretrained=False).feature_info.channels()
                assert len(set(width)) == 1, width
                SETTINGS.update(bb=name, width=width[0], auxiliary_classification=False)
                net = birefnet.BiRefNet(bb_pretrained=False)
            assert net.decoder.use_pyramid_neck and not any(
                p.requires_grad for k, p in net.named_parameters() if k.startswith("bb."))
            counts[name] = sum(p.numel() for p in net.parameters())
            print(name, counts[name], timm.__version__)
    finally:
        SETTINGS.clear()
        SETTINGS.update(saved)
    return counts


def checked(run, prefix: str):
    """`run(dtype)` -> dict of tensors, computed in float32 and float64; the float64 results as
    float32 (and the float32 run's distance recorded), as make_cnn_reference.py does."""
    out, ref = run(torch.float32), run(torch.float64)
    for k, v in out.items():
        err = relative_error(v.detach().numpy(), ref[k].detach().numpy())
        FLOAT32_ERROR[prefix + k] = err
        if not err < CONDITION_TOL:
            raise RuntimeError(f"ill-conditioned reference {prefix + k!r}: float32 is {err:.2e} from float64")
    return {k: v.detach().numpy() for k, v in ref.items()}


def eval_run(net: nn.Module, tensors: dict, x: np.ndarray, dtype) -> dict[str, torch.Tensor]:
    """Eval-mode logits and intermediates: the backbone's first call (full size), the encoder levels,
    and the outputs of the squeeze module, the pyramid neck and the decoder blocks."""
    net.to(dtype)
    net.load_state_dict(tensors, strict=True)
    net.eval()
    seen: dict[str, torch.Tensor] = {}

    def keep(name):
        def hook(mod, inputs, output):
            seen.setdefault(name, output)
        return hook

    watched = {"backbone": net.bb, "squeeze": net.squeeze_module}
    for level in (1, 2, 3, 4):
        for name in (f"pyramid_neck_x{level}", f"decoder_block{level}"):
            watched[name] = getattr(net.decoder, name)
    handles = [m.register_forward_hook(keep(name)) for name, m in watched.items()]
    xt = torch.from_numpy(x).to(dtype)
    with torch.no_grad():
        out = {"output": net(xt)[-1]}
        (levels, _) = net.forward_enc(xt)
    for h in handles:
        h.remove()
    out |= {f"backbone{j + 1}": f for j, f in enumerate(seen.pop("backbone"))}
    out |= {f"encoder{j + 1}": f for j, f in enumerate(levels)}
    return out | seen


def train_run(net: nn.Module, tensors: dict, x: np.ndarray, dtype) -> dict[str, torch.Tensor]:
    """One training-mode forward (frozen backbone), then a backward pass of `train_loss`."""
    net.to(dtype)
    net.load_state_dict(tensors, strict=True)
    net.train()
    net.zero_grad(set_to_none=True)
    (gdt, preds), cls_list = net(torch.from_numpy(x).to(dtype))
    loss = train_loss(preds, gdt[0], cls_list[0])
    loss.backward()
    params = dict(net.named_parameters())
    out = {f"pred{i}": p for i, p in enumerate(preds)}
    for i, (p, lab) in enumerate(zip(*gdt, strict=True)):
        out[f"gdt_pred{i}"] = p
        if i == 0:  # the labels differ only by the upsampled side output they multiply
            out[f"gdt_label{i}"] = lab
    out["cls"] = cls_list[0]
    BB_GRADS.append(sum(p.grad is not None for k, p in params.items() if k.startswith("bb.")))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--original", type=Path, default=ROOT / ".orig" / "BiRefNet")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    torch.manual_seed(0)
    net, original_config, timm_version = build_original(args.original.resolve())
    sd = net.state_dict()
    weights, buffers, values = make_recipe(sd, SEED, dino_weight_range)
    tensors = {k: torch.from_numpy(np.asarray(v)) for k, v in values.items()}
    for m in net.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0  # only active in training; it draws random numbers
    rng = np.random.Generator(np.random.PCG64(SEED + 1))
    arrays = {f"buffer/{k}": v for k, v in buffers.items()}
    for i, shape in enumerate(INPUT_SHAPES):
        x = image_like(rng, shape)
        arrays[f"input{i}"] = x
        res = checked(lambda dt, x=x: eval_run(net, tensors, x, dt), f"input{i}/")
        arrays[f"float64/output{i}"] = res["output"]
        arrays[f"output{i}"] = res.pop("output").astype(np.float32)
        for k, v in res.items():
            if k.startswith(THINNED):
                v = v[:, :: v.shape[1] // KEPT_CHANNELS]
            arrays[f"input{i}/{k}"] = v.astype(np.float32)
    x = image_like(rng, TRAIN_SHAPE)
    arrays["train/input"] = x
    res = checked(lambda dt: train_run(net, tensors, x, dt), "train/")
    bb_grads = sum(BB_GRADS)
    arrays |= {f"train/{k}": v.astype(np.float32) for k, v in res.items()}
    meta = {
        "name": "dinov3",
        "seed": SEED,
        "backbone": {"timm_model": TIMM_MODEL, **TINY, "out_indices": list(OUT_INDICES),
                     "features_only": True, "dynamic_img_size": True},
        "generator": {"torch": torch.__version__, "timm": timm_version, "computed_in": "float64, stored as float32"},
        "original_config": {k: v for k, v in original_config.items() if isinstance(v, (int, float, str, list, dict))},
        "inputs": {f"input{i}": list(s) for i, s in enumerate(INPUT_SHAPES)} | {"train/input": list(TRAIN_SHAPE)},
        "real_size_parameter_counts": real_size_parameter_counts(args.original.resolve()),
        "frozen_backbone_has_grad": bb_grads > 0,
        "state_dict_keys": list(sd),
        "weights": weights,
        "float32_error": dict(FLOAT32_ERROR),
    }
    (args.out / "model_dinov3.json").write_text(json.dumps(meta, indent=1, sort_keys=True, default=str))
    np.savez_compressed(args.out / "model_dinov3.npz", **arrays)
    sizes = [(args.out / f"model_dinov3.{ext}").stat().st_size for ext in ("json", "npz")]
    print(f"dinov3: {len(sd)} keys, worst float32 vs float64 {max(FLOAT32_ERROR.values()):.1e}, "
          f"json {sizes[0] / 1e3:.0f} kB, npz {sizes[1] / 1e3:.0f} kB, backbone grads {bb_grads}")


if __name__ == "__main__":
    main()
