"""Generate `tests/reference/model_<case>_float64.npz`: the original BiRefNet's logits for the
shared reference cases, computed in float64 (the shared data is float32, whose own rounding is
~3e-5 on these cases).

Needs a checkout of the original (github.com/ZhengPeng7/BiRefNet) and an environment with
torch, torchvision, timm, kornia, einops and huggingface_hub; one case per process, because the
original reads its config once at import:

    python tests/make_float64_reference.py /path/to/original swin_w7
    python tests/make_float64_reference.py /path/to/original train   # train_swin_w7_float64.npz

It first checks that the float32 run reproduces the shared reference exactly. The training
case replays the shared reference's step: PyTorch seed 0 before building, Swin's stochastic
depth on (its keep decisions are checked against train_swin_w7_droppath.npy), ASPP dropout off.
"""

import json
import sys
from functools import partial
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).parent


def rel(u, v):
    return float(np.linalg.norm(u - v) / np.linalg.norm(v))


def build_original(original: str, case: str):
    sys.path.insert(0, original)
    sys.path.insert(0, str(HERE))
    import config as original_config  # the original's Config, patched before its models import it

    meta = json.loads((HERE / "reference" / f"model_{case}.json").read_text())
    base_init = original_config.Config.__init__

    def patched_init(self):
        base_init(self)
        for k, v in meta["config_overrides"].items():
            setattr(self, k, v)
        self.lateral_channels_in_collection = meta["original_config"]["lateral_channels_in_collection"]
        self.cxt = meta["original_config"]["cxt"]

    original_config.Config.__init__ = patched_init
    import models.birefnet as birefnet

    b = meta["backbone"]
    if b["kind"] == "swin_v1":
        from models.backbones.swin_v1 import SwinTransformer

        def make():
            return SwinTransformer(embed_dim=b["embed_dim"], depths=b["depths"], num_heads=b["num_heads"],
                                   window_size=b["window_size"])
    else:
        from models.backbones.pvt_v2 import PyramidVisionTransformerImpr

        def make():
            return PyramidVisionTransformerImpr(
                patch_size=4, embed_dims=b["embed_dims"], num_heads=b["num_heads"], mlp_ratios=b["mlp_ratios"],
                qkv_bias=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), depths=b["depths"],
                sr_ratios=b["sr_ratios"])

    birefnet.build_backbone = lambda *args, **kwargs: make()
    return birefnet.BiRefNet(bb_pretrained=False)


def main(original: str, case: str):
    net = build_original(original, case)
    from reference_models import case_arrays, recipe_state_dict

    state = {k: torch.from_numpy(np.asarray(v)) for k, v in recipe_state_dict(case).items()}
    net.load_state_dict(state, strict=True)
    net.eval()
    arrays = case_arrays(case)
    out = {}
    with torch.no_grad():
        i = 0
        while f"input{i}" in arrays.files:
            x = torch.from_numpy(arrays[f"input{i}"])
            y32 = net(x)[-1].numpy()
            assert rel(y32, arrays[f"output{i}"]) < 1e-6, "the float32 run must reproduce the shared reference"
            y64 = net.double()(x.double())[-1].numpy()
            net.float()
            out[f"output{i}"] = y64
            print(case, i, "float32 reference vs float64:", rel(arrays[f"output{i}"], y64))
            i += 1
    np.savez_compressed(HERE / "reference" / f"model_{case}_float64.npz", **out)


def original_objective(preds, gdt, gt):
    """The original trainer's loss for this step: PixLoss with the DIS5K weights on the four
    outputs plus the BCE of the sigmoid gradient predictions against the sigmoid labels."""
    import torch.nn.functional as F
    from loss import PixLoss

    pix = PixLoss()
    loss_pix, parts = pix(preds, torch.clamp(gt, 0, 1), pix_loss_lambda=1.0)
    loss_gdt = 0.0
    for pred, label in zip(*gdt, strict=True):
        pred = F.interpolate(pred, size=label.shape[2:], mode="bilinear", align_corners=True).sigmoid()
        loss_gdt = loss_gdt + torch.nn.BCELoss()(pred, label.sigmoid())
    parts = {f"loss_dict/{k}": v for k, v in parts.items()}
    parts |= {"loss_pix": loss_pix.item(), "loss_gdt": loss_gdt.item()}
    return loss_pix + loss_gdt, parts


def main_train(original: str):
    torch.manual_seed(0)
    net = build_original(original, "swin_w7")
    from reference_models import recipe_state_dict
    from timm.layers import DropPath

    net.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in recipe_state_dict("swin_w7").items()})
    for m in net.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    net.train()
    net.double()
    masks = []

    def record(mod, inputs, output):
        x = inputs[0]
        ratio = output * (1 - mod.drop_prob) / torch.where(x == 0, torch.ones_like(x), x)
        masks.append(ratio.reshape(x.shape[0], -1)[:, 0].round().detach().numpy().astype(np.uint8))

    for m in net.modules():
        if isinstance(m, DropPath):
            m.register_forward_hook(record)
    data = np.load(HERE / "reference" / "train_swin_w7.npz")
    (gdt, preds), _ = net(torch.from_numpy(data["input"]).double())
    assert np.array_equal(np.stack(masks), np.load(HERE / "reference" / "train_swin_w7_droppath.npy"))
    loss, parts = original_objective(preds, gdt, torch.from_numpy(data["gt"]).double())
    loss.backward()
    meta = json.loads((HERE / "reference" / "train_swin_w7.json").read_text())
    print("loss float64 vs shared float32:", float(loss), meta["loss"], {k: (v, meta.get(k)) for k, v in parts.items()})
    out = {f"pred{i}": p.detach().numpy() for i, p in enumerate(preds)}
    out |= {f"loss/{k}": np.float64(v) for k, v in parts.items()}
    out["loss/loss"] = np.float64(loss.item())
    grads = {k: p.grad for k, p in net.named_parameters() if p.grad is not None}
    out["grad_global_norm"] = np.float64(torch.sqrt(sum(g.pow(2).sum() for g in grads.values())).item())
    print("grad norm float64 vs shared float32:", out["grad_global_norm"], meta["grad_global_norm"])
    # Every parameter's gradient norm (small) and the full gradients of the parameters the
    # shared reference stores.
    out |= {f"grad_norm/{k}": np.float64(g.norm().item()) for k, g in grads.items()}
    out |= {f"grad/{k.split('/', 1)[1]}": grads[k.split("/", 1)[1]].numpy() for k in data.files
            if k.startswith("grad/")}
    for i in range(3):
        out[f"gdt_pred{i}"] = gdt[0][i].detach().numpy()
        out[f"gdt_label{i}"] = gdt[1][i].detach().numpy()
    state = net.state_dict()
    for key in data.files:
        if key.startswith("after_step/"):
            out[key] = state[key.split("/", 1)[1]].numpy()
    print({k: rel(data[k], v) for k, v in out.items() if k in data.files})
    np.savez_compressed(HERE / "reference" / "train_swin_w7_float64.npz", **out)


if __name__ == "__main__":
    if sys.argv[2] == "train":
        main_train(sys.argv[1])
    else:
        main(sys.argv[1], sys.argv[2])
