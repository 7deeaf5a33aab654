"""DINOv3 backbones against timm's `features_only` models, as the original BiRefNet builds them.

Reference data (`reference/dinov3_*`, made by `make_dinov3_reference.py` with timm 1.0.31):
three shrunk but structurally exact models (SwiGLU as S+/H+/7B, GELU MLP as S/B/L, the `_qkvb`
biases), their four feature maps and intermediates computed in float64, the real presets'
architecture and parameter counts, and rows of the rotary tables of the real head widths.
"""

import dataclasses
import json
from functools import cache
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from reference_models import state_dict_from_recipe, to_float64

from birefnet_jax.backbones import BACKBONES, build_backbone, detect, dinov3
from birefnet_jax.backbones.spec import ArchitectureError
from birefnet_jax.convert import ConversionError, load_state_dict_into, write_safetensors
from birefnet_jax.convert.keymap import path_to_torch_key
from birefnet_jax.convert.timm import dinov3_from_timm
from birefnet_jax.nn.state import count_params, materialize_rng_state
from birefnet_jax.verify import relative_error

REF = Path(__file__).parent / "reference"
CASES = ("swiglu", "mlp", "qkvb")
TOL = 1e-4  # relative L2; timm's own float32 run is within 3e-6 of its float64 one
nchw = lambda a: np.asarray(a).transpose(0, 3, 1, 2)  # noqa: E731
nhwc = lambda a: np.asarray(a).transpose(0, 2, 3, 1)  # noqa: E731


@cache
def _meta(case: str) -> dict:
    return json.loads((REF / f"dinov3_{case}.json").read_text())


@cache
def _arrays(case: str, suffix: str = "") -> dict[str, np.ndarray]:
    with np.load(REF / f"dinov3_{case}{suffix}.npz") as z:
        return {k: z[k] for k in z.files}


def _timm_state_dict(case: str) -> dict[str, np.ndarray]:
    """The whole timm model's state dict (as released weights are laid out), from the recipe."""
    meta = _meta(case)
    return state_dict_from_recipe({"state_dict_keys": meta["timm_state_dict_keys"], "weights": meta["weights"]}, {})


def _birefnet_state_dict(case: str) -> dict[str, np.ndarray]:
    """The backbone keys of an original BiRefNet around it: `bb.` + timm features_only's keys."""
    sd = _timm_state_dict(case)
    return {k: sd[k[len("bb.model."):]] for k in _meta(case)["state_dict_keys"]}


def _untold(case: str) -> dict:
    """What the weights of a non-preset size cannot tell."""
    a = _meta(case)["architecture"]
    return {"num_heads": a["num_heads"], "out_indices": tuple(a["out_indices"]), "depth": a["depth"]}


@cache
def _backbone(case: str) -> dinov3.DinoV3:
    sd = _birefnet_state_dict(case)
    cfg = dinov3.infer_config(sd, **_untold(case))
    bb = nnx.eval_shape(lambda: build_backbone(cfg, rngs=nnx.Rngs(0)))
    load_state_dict_into(bb, {k[len("bb."):]: v for k, v in sd.items()})
    return materialize_rng_state(bb)


_forward = nnx.jit(lambda bb, x: bb(x))


def _check_features(case, feats, arrays, prefix, tol=TOL):
    assert len(feats) == 4
    errors = {}
    for j, f in enumerate(feats):
        ref = arrays[f"{prefix}/features{j + 1}"]
        assert nchw(f).shape == ref.shape, (prefix, j, f.shape, ref.shape)
        errors[j] = relative_error(nchw(f), ref), float(np.abs(nchw(f) - ref).max())
    assert all(e < tol for e, _ in errors.values()), (case, prefix, errors)
    return errors


@pytest.mark.parametrize("case", CASES)
def test_features_match_timm(case):
    """The four maps of every stored input (square and non-square), NHWC, float32."""
    bb, arrays = _backbone(case), _arrays(case)
    a = _meta(case)["architecture"]
    assert len(bb.model.blocks) == max(a["out_indices"]) + 1  # the blocks features_only keeps
    assert bb.cfg.channels == (a["embed_dim"],) * 4
    for i, shape in enumerate(_meta(case)["inputs"].values()):
        x = nhwc(arrays[f"input{i}"])
        feats = _forward(bb, x)
        assert all(f.shape == (shape[0], shape[2] // 16, shape[3] // 16, a["embed_dim"]) for f in feats)
        assert all(f.dtype == jnp.float32 for f in feats)
        _check_features(case, feats, arrays, f"input{i}")


def test_intermediates_match_timm(case="swiglu"):
    """Patch embedding, tokens with class and registers, rotary table, block 0 (eager)."""
    bb, arrays = _backbone(case), _arrays(case)
    vit = bb.model
    x = nhwc(arrays["input0"])
    h, w = x.shape[1] // 16, x.shape[2] // 16
    assert relative_error(vit.patch_embed(x), arrays["input0/patch_embed"]) < TOL
    tokens, grid = vit.tokens(x)
    assert grid == (h, w)
    assert relative_error(tokens, arrays["input0/tokens"]) < TOL
    rope = dinov3.rope_embed(h, w, bb.cfg.head_dim)
    assert rope.shape == arrays["input0/rope"].shape
    assert np.abs(rope - arrays["input0/rope"]).max() < 1e-6
    block0, _ = vit.blocks[0]((tokens, vit.rope(grid, tokens.dtype)))
    assert relative_error(block0, arrays["input0/block0"]) < TOL


def test_rope_tables_of_the_real_widths():
    """Rows of timm's float32 tables for head widths 64 and 128 at 1024x1024 and 2560x1440, and
    the periods bit for bit (timm rounds the float64 power to float32)."""
    ref = _arrays("rope")
    for head_dim in (64, 128):
        n = head_dim // 4
        exps = np.float32(2.0) * np.arange(n, dtype=np.float32) / np.float32(head_dim // 2)
        np.testing.assert_array_equal((100.0 ** exps.astype(np.float64)).astype(np.float32),
                                      ref[f"head{head_dim}/periods"])
        for h, w in ((64, 64), (90, 160)):
            rows = ref[f"head{head_dim}/grid{h}x{w}/rows"]
            table = dinov3.rope_embed(h, w, head_dim)
            assert table.shape == (h * w, 2 * head_dim) and table.dtype == np.float32
            np.testing.assert_allclose(table[rows], ref[f"head{head_dim}/grid{h}x{w}/table"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("case", ["swiglu", "mlp"])
def test_float64_exact(case):
    """In float64 the port matches timm run in float64 to rounding."""
    expected = _arrays(case, "_float64")
    with jax.enable_x64(True):
        bb = to_float64(nnx.clone(_backbone(case)))
        for i in range(1 if case == "mlp" else 2):  # the non-square input in one case: compiles are the cost
            x = nhwc(_arrays(case)[f"input{i}"]).astype(np.float64)
            feats = _forward(bb, x)
            assert all(f.dtype == jnp.float64 for f in feats)
            for j, f in enumerate(feats):
                err = relative_error(nchw(f), expected[f"input{i}/features{j + 1}"])
                assert err < 1e-10, (case, i, j, err)


def _presets_meta() -> dict:
    return json.loads((REF / "dinov3_presets.json").read_text())["presets"]


@cache
def _abstract_stem(name: str) -> dinov3.DinoV3:
    """A preset's backbone with shapes only, cut to its first four blocks (the blocks are built
    alike). Whole presets take 0.4 s (S) to 5 s (7B) to trace on one core, quadratic in the block
    count (each RNG draw of the trace walks the whole trace so far), too long for this file."""
    cfg = dataclasses.replace(dinov3.PRESETS[name], depth=4, out_indices=(0, 1, 2, 3))
    return nnx.eval_shape(lambda: dinov3.DinoV3(cfg, rngs=nnx.Rngs(0)))


def _preset_params(name: str) -> dict[tuple, tuple]:
    """path -> shape of every parameter of a preset's backbone: the stem's, block 0 repeated."""
    blocks = dinov3.PRESETS[name].num_blocks
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(_abstract_stem(name), nnx.Param)):
        path, shape = tuple(path), var.get_value().shape
        if path[:2] != ("model", "blocks"):
            out[path] = shape
        elif path[2] == 0:
            out |= {path[:2] + (i,) + path[3:]: shape for i in range(blocks)}
    return out


def test_presets_are_timms():
    """The six presets: timm's architecture, the original's out_indices, timm's parameter counts
    (shapes only: the 7B is never allocated)."""
    presets = _presets_meta()
    assert set(presets) == {k for k in BACKBONES if k.startswith("dino_v3")} == set(dinov3.PRESETS)
    for name, p in presets.items():
        cfg, arch = BACKBONES[name], p["features_only"]
        assert cfg.out_indices == tuple(p["out_indices"]) and cfg.depth == p["depth"], name
        ours = dict(embed_dim=cfg.embed_dim, num_heads=cfg.num_heads, head_dim=cfg.head_dim, blocks=cfg.num_blocks,
                    swiglu=cfg.swiglu, hidden_features=cfg.hidden_features, num_reg_tokens=cfg.num_reg_tokens,
                    num_prefix_tokens=cfg.num_prefix_tokens, qkv_bias=cfg.qkv_bias, layer_scale=cfg.layer_scale,
                    norm_eps=cfg.norm_eps, patch_size=cfg.patch_size, rope_temperature=cfg.rope_temperature)
        assert ours == {k: arch[k] for k in ours}, name
        assert sum(int(np.prod(s)) for s in _preset_params(name).values()) == p["params_features_only"], name
    assert presets["dino_v3_7b"]["params_features_only"] == 6_716_022_784
    # the whole smallest preset, built as it is, counts the same
    whole = nnx.eval_shape(lambda: dinov3.DinoV3(dinov3.PRESETS["dino_v3_s"], rngs=nnx.Rngs(0)))
    assert len(whole.model.blocks) == 12
    assert count_params(whole) == presets["dino_v3_s"]["params_features_only"] == 21_586_176


def _shape_only_state_dict(name: str) -> dict[str, np.ndarray]:
    """BiRefNet-side `bb.*` keys of a preset's backbone with zero-cost arrays of their shapes."""
    out = {}
    for path, shape in _preset_params(name).items():
        if path[-1] == "kernel":
            shape = shape[::-1] if len(shape) == 2 else (shape[3], shape[2], shape[0], shape[1])
        out["bb." + path_to_torch_key(path)] = np.broadcast_to(np.float32(0), shape)
    return out


@pytest.mark.parametrize("name", sorted(dinov3.PRESETS))
def test_infer_presets(name):
    """The presets come back from their BiRefNet keys and from a whole timm checkpoint's."""
    cfg = dinov3.PRESETS[name]
    sd = _shape_only_state_dict(name)
    assert len(sd) == _presets_meta()[name]["state_dict_keys_features_only"]
    assert detect(sd).kind == "dinov3"
    assert dinov3.infer_config(sd) == cfg
    timm_sd = {k[len("bb.model."):]: v for k, v in sd.items()}
    timm_sd["norm.weight"] = timm_sd["norm.bias"] = np.zeros(cfg.embed_dim, np.float32)
    assert dinov3.infer_config_timm(timm_sd) == cfg
    qkvb = {**timm_sd, "blocks.0.attn.q_bias": np.zeros(cfg.embed_dim), "blocks.0.attn.v_bias": np.zeros(cfg.embed_dim)}
    assert dinov3.infer_config_timm(qkvb).qkv_bias


def test_infer_small_needs_the_untold():
    sd = _birefnet_state_dict("mlp")
    with pytest.raises(ArchitectureError, match="num_heads and out_indices"):
        dinov3.infer_config(sd)
    with pytest.raises(ArchitectureError, match="needs 5 blocks, the checkpoint has 8"):
        dinov3.infer_config(sd, num_heads=2, out_indices=(0, 1, 2, 4))
    with pytest.raises(ArchitectureError, match="fixed by the weights"):
        dinov3.infer_config(sd, embed_dim=64, **_untold("mlp"))
    with pytest.raises(ArchitectureError, match="not divisible"):
        dinov3.infer_config(sd, num_heads=3, out_indices=(0, 1, 2, 3))


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_timm_checkpoint_loads(fmt, tmp_path):
    """Released-weights layout (whole model: final norm and the block features_only prunes
    included), written as a user's file, gives timm's features."""
    case = "swiglu"
    sd = _timm_state_dict(case)
    assert {"norm.weight", "norm.bias", "blocks.5.norm1.weight"} <= set(sd)
    path = tmp_path / f"dinov3.{fmt}"
    if fmt == "pth":
        torch = pytest.importorskip("torch", reason="the torch extra is needed to write .pth files")
        torch.save({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, path)
    else:
        write_safetensors(sd, path)
    untold = _untold(case)
    bb = dinov3_from_timm(path, num_heads=untold["num_heads"], out_indices=untold["out_indices"])
    assert bb.cfg.depth == 6 and bb.cfg.num_blocks == 5
    got = _backbone(case)
    for (p, a), (_, b) in zip(nnx.to_flat_state(nnx.state(bb, nnx.Param)),
                              nnx.to_flat_state(nnx.state(got, nnx.Param)), strict=True):
        np.testing.assert_array_equal(a.get_value(), b.get_value(), err_msg=str(p))
    if fmt == "safetensors":
        _check_features(case, _forward(bb, nhwc(_arrays(case)["input1"])), _arrays(case), "input1")


def test_timm_checkpoint_errors():
    sd = _timm_state_dict("mlp")
    kw = {"num_heads": 2, "out_indices": (0, 1, 2, 3)}
    bad = dict(sd, **{"blocks.1.mlp.fc2.weight": np.zeros((32, 100), np.float32), "pos_embed": np.zeros((1, 5, 32))})
    del bad["blocks.2.norm1.bias"]
    with pytest.raises(ConversionError) as e:
        dinov3_from_timm(bad, **kw)
    msg = str(e.value)
    assert "blocks.1.mlp.fc2.weight: checkpoint (32, 100)" in msg
    assert "unexpected keys:\n  pos_embed" in msg
    assert "blocks.2.norm1.bias" in msg.partition("missing keys:")[2].partition("unexpected")[0]
    with pytest.raises(ArchitectureError, match="patch_embed.proj.weight"):
        dinov3_from_timm({"layers.0.blocks.0.attn.qkv.weight": np.zeros((3, 1))}, **kw)
    with pytest.raises(ArchitectureError, match="Meta's original layout"):
        dinov3_from_timm({"storage_tokens": np.zeros((1, 4, 32)), **sd}, **kw)
    with pytest.raises(ArchitectureError, match="depth=5"):
        dinov3_from_timm(sd, depth=5, **kw)


def test_input_size_must_be_multiple_of_16():
    with pytest.raises(ValueError, match="multiples of its patch size 16"):
        _backbone("qkvb")(np.zeros((1, 40, 48, 3), np.float32))


def test_blocked_attention_is_whole_attention(monkeypatch):
    """The CPU path (queries in blocks) computes the same as one step, including a ragged last block."""
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 37, 3, 8)), jnp.float32) for _ in range(3))
    monkeypatch.setattr(dinov3, "_ATTN_BLOCK", 37 * 3 * 5)
    whole = dinov3._attend(q, k, v, 0.3)
    np.testing.assert_allclose(dinov3._attend_blocked(q, k, v, 0.3), whole, rtol=1e-6, atol=1e-6)


def _primitive_dtypes(jaxpr) -> set[tuple[str, str]]:
    """(primitive, output dtype) of every equation, nested jaxprs (scan, cond branches) included."""
    found = set()

    def walk(j):
        for eqn in j.eqns:
            found.add((eqn.primitive.name, str(eqn.outvars[0].aval.dtype)))
            for p in eqn.params.values():
                for sub in p if isinstance(p, (list, tuple)) else (p,):
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns"):
                        walk(inner)

    walk(jaxpr)
    return found


def test_bfloat16_compute():
    """bfloat16 compute with float32 parameters: bfloat16 maps, close to timm's float32 ones;
    softmax, layer-norm statistics and the rotary tables stay float32."""
    case = "swiglu"
    sd = _birefnet_state_dict(case)
    cfg = dinov3.infer_config(sd, **_untold(case))
    bb = nnx.eval_shape(lambda: dinov3.DinoV3(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16))
    load_state_dict_into(bb, {k[len("bb."):]: v for k, v in sd.items()})
    materialize_rng_state(bb)
    assert all(p.get_value().dtype == jnp.float32 for _, p in nnx.to_flat_state(nnx.state(bb, nnx.Param)))
    x = nhwc(_arrays(case)["input0"])
    graph, state = nnx.split(bb)
    ops = _primitive_dtypes(jax.make_jaxpr(lambda s, x: nnx.merge(graph, s)(x))(state, x).jaxpr)
    assert ("exp", "float32") in ops and ("exp", "bfloat16") not in ops  # softmax
    assert ("rsqrt", "float32") in ops and ("rsqrt", "bfloat16") not in ops  # layer norms
    assert ("dot_general", "bfloat16") in ops  # the projections
    feats = _forward(bb, x)
    assert all(f.dtype == jnp.bfloat16 for f in feats)
    errors = _check_features(case, [f.astype(jnp.float32) for f in feats], _arrays(case), "input0", tol=0.05)
    assert max(e for e, _ in errors.values()) > 1e-4  # it did compute in bfloat16
    sin, cos = bb.model.rope((4, 4), jnp.bfloat16)
    assert sin.dtype == cos.dtype == jnp.float32
