"""Generate `tests/reference/cnn_<name>.json/.npz`: reference data for the torchvision-layout
backbones (vgg16, vgg16bn, resnet50) with random weights.

Needs torchvision, which is not a project dependency (it pins its own torch build); run it from
an environment that has it, e.g.

    python -m venv --system-site-packages /tmp/tvenv
    /tmp/tvenv/bin/pip install torch==2.14.1 torchvision==0.29.1
    /tmp/tvenv/bin/python tests/make_cnn_reference.py [--original /tmp/orig]

The backbone is built from torchvision and cut into four stages as the original BiRefNet does
(`bb.conv1..conv4`). Weights are never stored: the JSON holds a NumPy recipe per tensor (see
`tests/reference/README.md`). With `--original` (a checkout of github.com/ZhengPeng7/BiRefNet,
plus `pip install timm kornia einops huggingface_hub`) the full original BiRefNet is built
around that backbone (decoder switches per CASES), and its logits are stored too: eval mode on
the stored inputs, and one training-mode forward (ASPP dropout set to 0) on a batch of four,
with some of the BatchNorm running statistics it steps. Without it, the decoder keys come from
this package's exporter and only the backbone outputs are stored.

Every stored output is computed in float64 and stored as float32; `float32_error` in the JSON
records how far the same code runs in float32, which must stay below CONDITION_TOL.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch import nn
from torchvision.models import resnet50, vgg16, vgg16_bn

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "reference"
NAMES = ("vgg16", "vgg16bn", "resnet50")
# Backbone inputs, NCHW; the end-to-end eval outputs use the same ones.
INPUT_SHAPES = ((1, 3, 64, 64), (1, 3, 64, 96))
TRAIN_SHAPE = (4, 3, 64, 64)  # BatchNorm over 2 pooled values is too ill-conditioned
FLOAT32_ERROR: dict[str, float] = {}  # per stored output: the original's own float32 rounding
CONDITION_TOL = 3e-5  # the original's float32 run must be this close: the tests allow 1e-4
# The original's `lateral_channels_in_collection` for these backbones (deep to shallow).
ORIGINAL_LATERAL = {"vgg16": [512, 512, 256, 128], "vgg16bn": [512, 512, 256, 128],
                    "resnet50": [2048, 1024, 512, 256]}
# Decoder switches of each end-to-end case, as BiRefNetConfig fields (the original's Config
# attributes of the same names): vgg16 has the released default decoder; the others vary it,
# and resnet50 runs without the multi-scale input.
CASES = {
    "vgg16": {},
    "vgg16bn": {"dec_att": "ASPP", "dec_blk": "ResBlk", "squeeze_block": "ResBlk_x1", "cxt_num": 2},
    "resnet50": {"mul_scl_ipt": "", "dec_att": ""},
}
# BatchNorm running statistics whose training-mode update is stored.
AFTER_STEP_SUFFIXES = (".running_mean", ".running_var")
AFTER_STEP_EVERY = 7


def torchvision_backbone(name: str) -> nn.Module:
    """torchvision's network cut into the original's four stages."""
    if name == "vgg16":
        f = vgg16(weights=None).features
        stages = (f[:10], f[10:17], f[17:24], f[24:31])
    elif name == "vgg16bn":
        f = vgg16_bn(weights=None).features
        stages = (f[:14], f[14:24], f[24:34], f[34:44])
    elif name == "resnet50":
        r = resnet50(weights=None)
        stages = (nn.Sequential(r.conv1, r.bn1, r.relu, r.maxpool, r.layer1), r.layer2, r.layer3, r.layer4)
    else:
        raise ValueError(name)
    return nn.Sequential(OrderedDict((f"conv{i + 1}", s) for i, s in enumerate(stages)))


def run_stages(bb: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    outs = []
    for stage in bb:
        x = stage(x)
        outs.append(x)
    return outs


def weight_range(key: str, shape: tuple, keys: set) -> tuple[float, float] | None:
    """Uniform range for one float tensor, chosen so activations stay O(1); None: not a float."""
    module, _, leaf = key.rpartition(".")
    if leaf == "num_batches_tracked":
        return None
    is_bn = f"{module}.running_mean" in keys
    if leaf == "running_mean":
        return -0.1, 0.1
    if leaf == "running_var":
        return 0.5, 2.0
    if is_bn and leaf == "weight" and module.startswith("bb.") and module.endswith(".bn3"):
        return 0.2, 0.5  # damp ResNet's residual branches, or 16 additions blow the scale up
    if is_bn:
        return (0.5, 1.5) if leaf == "weight" else (-0.1, 0.1)
    deform_aux = module.endswith(("offset_conv", "modulator_conv"))
    if leaf == "bias":
        if module.endswith("offset_conv"):
            return -1.5, 1.5  # offsets of about a pixel: bilinear sampling between taps
        return (-0.8, 0.8) if deform_aux else (-0.02, 0.02)
    if leaf == "weight" and len(shape) == 4:
        if deform_aux:
            # Offsets of about the bias (fractional pixels) varying by ~0.5 pixel: larger varying
            # offsets on 2x2 maps turn float32 rounding into 1e-4 errors in training mode.
            a = 0.5 * float(np.sqrt(3.0 / (shape[1] * shape[2] * shape[3])))
        else:
            a = float(np.sqrt(6.0 / (shape[1] * shape[2] * shape[3])))  # He uniform
        return -a, a
    if leaf == "weight" and len(shape) == 2:
        a = float(np.sqrt(6.0 / shape[1]))
        return -a, a
    raise ValueError(f"no recipe rule for {key} {shape}")


def make_recipe(state_dict: dict[str, torch.Tensor], seed: int, value_range=None):
    """(weights recipe, integer buffers, the rebuilt float32 state dict). `value_range(key, shape,
    keys)` gives a tensor's (low, high), or None for a buffer stored as it is (default: `weight_range`)."""
    value_range = value_range or weight_range
    keys = set(state_dict)
    master = np.random.Generator(np.random.PCG64(seed))
    weights, buffers, values = {}, {}, {}
    for key, t in state_dict.items():
        shape = tuple(t.shape)
        rng_range = value_range(key, shape, keys)
        if rng_range is None:
            buffers[key] = t.numpy().copy()
            values[key] = buffers[key]
            continue
        low, high = rng_range
        s = int(master.integers(0, 2**32))
        weights[key] = {"seed": s, "low": low, "high": high, "shape": list(shape)}
        v = low + (high - low) * np.random.Generator(np.random.PCG64(s)).random(int(np.prod(shape)))
        values[key] = v.astype(np.float32).reshape(shape)
    return weights, buffers, values


def build_original(orig_dir: Path, name: str) -> tuple[nn.Module, dict]:
    """The original BiRefNet around backbone `name` with the decoder switches of CASES[name].

    Its Config hard-codes every switch and several of its modules read a Config made at import
    time, so the original's modules are imported afresh for each build, with a Config whose
    attributes are overridden after its own __init__."""
    for mod in [m for m, v in sys.modules.items() if str(getattr(v, "__file__", "") or "").startswith(str(orig_dir))]:
        del sys.modules[mod]
    if str(orig_dir) not in sys.path:
        sys.path.insert(0, str(orig_dir))
    import config as orig_config

    unpatched = orig_config.Config.__init__

    def patched(self):
        unpatched(self)
        self.bb = name
        for field, value in CASES[name].items():
            setattr(self, field, value)
        lat = ORIGINAL_LATERAL[name]
        self.lateral_channels_in_collection = [c * 2 for c in lat] if self.mul_scl_ipt == "cat" else list(lat)
        self.cxt = self.lateral_channels_in_collection[1:][::-1][-self.cxt_num:] if self.cxt_num else []

    orig_config.Config.__init__ = patched
    from models.birefnet import BiRefNet

    return BiRefNet(bb_pretrained=False), vars(orig_config.Config())


def relative_error(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def checked(run, prefix: str):
    """`run(dtype)` computed in float64, stored as float32, so that a reference carries no
    rounding of its own (fan-ins of ~70k terms cost float32 ~1e-5). The float32 run's distance
    is recorded (`float32_error`): batch statistics over few values amplify rounding, and a
    float32 port cannot be expected closer than the original's own float32 run."""
    out, ref = run(torch.float32), run(torch.float64)  # float64 last: its BatchNorm steps remain
    single = not isinstance(out, dict)
    if single:
        ref, out = {"": ref}, {"": out}
    for k, v in out.items():
        err = relative_error(v, ref[k])
        FLOAT32_ERROR[prefix + k] = err
        if not err < CONDITION_TOL:
            raise RuntimeError(f"ill-conditioned reference {prefix + k!r}: float32 is {err:.2e} from float64; "
                               "change the inputs or the weight ranges")
    ref = {k: v.numpy().astype(np.float32) for k, v in ref.items()}
    return ref[""] if single else ref


def image_like(rng, shape) -> np.ndarray:
    """Normalised-image stand-in whose images differ globally (a smooth random pattern plus
    noise): training-mode BatchNorm of globally pooled features divides by their spread over
    the batch, which i.i.d. noise images make nearly zero."""
    b, c, h, w = shape
    coarse = torch.from_numpy(rng.standard_normal((b, c, 4, 4)))
    smooth = nn.functional.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False).numpy()
    return (smooth + 0.5 * rng.standard_normal(shape)).astype(np.float32)


def original_forward(full: nn.Module, tensors: dict, x: np.ndarray, dtype, *, train: bool):
    """Eval: the final logits. Train: multi-scale logits and gradient-attention maps (running
    statistics are stepped, so the weights are reloaded each time)."""
    full.to(dtype)
    full.load_state_dict(tensors, strict=True)
    full.train(train)
    out = full(torch.from_numpy(x).to(dtype))
    if not train:
        return out[-1]
    (gdt, preds), _ = out
    res = {f"pred{i}": p for i, p in enumerate(preds)}
    for i, (p, lab) in enumerate(zip(*gdt, strict=True)):
        res[f"gdt_pred{i}"], res[f"gdt_label{i}"] = p, lab
    return res


def our_decoder_keys(name: str) -> dict[str, torch.Tensor]:
    """Non-backbone keys of this package's export of the default BiRefNet (no original at hand)."""
    sys.path.insert(0, str(ROOT))
    from flax import nnx

    from birefnet_jax.config import BACKBONES, BiRefNetConfig
    from birefnet_jax.convert import model_to_state_dict
    from birefnet_jax.model import BiRefNet

    model = BiRefNet(BiRefNetConfig(backbone=BACKBONES[name], **CASES[name]), rngs=nnx.Rngs(0))
    return {k: torch.from_numpy(v) for k, v in model_to_state_dict(model).items() if not k.startswith("bb.")}


def generate(name: str, seed: int, orig_dir: Path | None, out_dir: Path = OUT) -> None:
    torch.manual_seed(0)
    bb = torchvision_backbone(name)
    original_config = None
    if orig_dir is not None:
        full, original_config = build_original(orig_dir, name)
        sd = full.state_dict()
        tv_keys = {f"bb.{k}" for k in bb.state_dict()}
        got = {k for k in sd if k.startswith("bb.")}
        assert got == tv_keys, (sorted(got ^ tv_keys)[:10])
    else:
        full = None
        sd = {f"bb.{k}": v for k, v in bb.state_dict().items()} | our_decoder_keys(name)
    weights, buffers, values = make_recipe(sd, seed)
    tensors = {k: torch.from_numpy(np.asarray(v)) for k, v in values.items()}
    bb.load_state_dict({k[3:]: v for k, v in tensors.items() if k.startswith("bb.")}, strict=True)
    bb.eval()
    rng = np.random.Generator(np.random.PCG64(seed + 1))
    arrays = {f"buffer/{k}": v for k, v in buffers.items()}
    for i, shape in enumerate(INPUT_SHAPES):
        x = rng.standard_normal(shape).astype(np.float32)
        arrays[f"input{i}"] = x
        feats = checked(lambda dt, x=x: {f"backbone{j + 1}": f for j, f in
                                         enumerate(run_stages(bb.to(dt), torch.from_numpy(x).to(dt)))},
                        f"input{i}/")
        arrays |= {f"input{i}/{k}": f for k, f in feats.items()}
        if full is not None:
            arrays[f"output{i}"] = checked(lambda dt, x=x: original_forward(full, tensors, x, dt, train=False),
                                           f"output{i}")
    if full is not None:
        for m in full.modules():
            if isinstance(m, nn.Dropout):
                m.p = 0.0
        x = image_like(rng, TRAIN_SHAPE)
        arrays["train/input"] = x
        outs = checked(lambda dt: original_forward(full, tensors, x, dt, train=True), "train/")
        arrays |= {f"train/{k}": v for k, v in outs.items()}
        after = full.state_dict()  # the float64 run's, which `checked` makes last
        bn_keys = [k for k in after if k.endswith(AFTER_STEP_SUFFIXES)]
        for k in bn_keys[::AFTER_STEP_EVERY] + bn_keys[-2:]:
            arrays[f"train/after_step/{k}"] = after[k].numpy().astype(np.float32)

    meta = {
        "name": name,
        "seed": seed,
        "config_overrides": CASES[name],
        "generator": {"torch": torch.__version__, "torchvision": torchvision.__version__,
                      "original": orig_dir is not None, "computed_in": "float64, stored as float32"},
        "original_config": original_config,
        "inputs": {f"input{i}": list(s) for i, s in enumerate(INPUT_SHAPES)},
        "state_dict_keys": list(sd),
        "weights": weights,
        "float32_error": dict(FLOAT32_ERROR),
    }
    FLOAT32_ERROR.clear()
    (out_dir / f"cnn_{name}.json").write_text(json.dumps(meta, indent=1, sort_keys=True, default=str))
    np.savez_compressed(out_dir / f"cnn_{name}.npz", **arrays)
    sizes = [(out_dir / f"cnn_{name}.{ext}").stat().st_size for ext in ("json", "npz")]
    print(f"{name}: worst float32 vs float64 {max(meta['float32_error'].values()):.1e};", end=" ")
    print(f"{name}: {len(sd)} keys, json {sizes[0] / 1e3:.0f} kB, npz {sizes[1] / 1e3:.0f} kB")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--original", type=Path, help="checkout of the original BiRefNet (adds end-to-end logits)")
    ap.add_argument("--names", nargs="+", default=list(NAMES), choices=NAMES)
    ap.add_argument("--out", type=Path, default=OUT, help="output folder (default: tests/reference)")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    for i, name in enumerate(NAMES):
        if name in args.names:
            generate(name, seed=1000 + i, orig_dir=args.original, out_dir=args.out)


if __name__ == "__main__":
    main()
