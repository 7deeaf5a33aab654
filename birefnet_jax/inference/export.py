"""Export for serving: the eval-mode forward as a serialized StableHLO program (`jax.export`), or a
TensorFlow SavedModel (`jax2tf`).

A serving process then needs JAX (or TensorFlow) only: no Flax and no model code. Files written by
`save_exported(exported, "model.jaxexport", ...)` (or `export_to_file`, or `birefnet-jax export`):

  model.jaxexport               `Exported.serialize()`, the program (StableHLO + signature)
  model.jaxexport.json          sidecar: input/output shapes and dtypes, layout, resolution, batch,
                                the model config, and with weights="argument" the weights' order
  model.jaxexport.weights.npz   only with weights="argument": the parameters, by name

With weights="embedded" the parameters are constants of the program, which takes one input (the
images). With weights="argument" it takes `(weights, images)`, `weights` being the flat list of
parameter and BatchNorm-statistic arrays in `model_weights(model)` order (the model's state paths,
sorted as `nnx.state` flattens them); that order is written to the sidecar (`weights_order`) and
the .npz holds the arrays under those names. Use it to swap weights without re-exporting, or to
keep the program small.

`load_exported` lives in `birefnet_jax.inference.exported`, which imports nothing of this package,
so a serving process can run a program without it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from birefnet_jax._optional import require
from birefnet_jax.inference.exported import (
    FORMAT,
    FORMAT_VERSION,
    load_exported,
    sidecar_paths,
)
from birefnet_jax.io.files import atomic_paths, umask
from birefnet_jax.io.images import IMAGENET_MEAN, IMAGENET_STD
from birefnet_jax.model import BiRefNet, abstract_model, eval_forward
from birefnet_jax.nn.state import state_path_name

WEIGHTS_MODES = ("embedded", "argument")
LAYOUTS = ("NHWC", "NCHW")
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")  # what jax.export lowers for


def check_platforms(platforms: Sequence[str] | None) -> tuple[str, ...] | None:
    """The lowering platforms, lower-cased and each once; ValueError for a name JAX cannot lower
    for (jax.export would write a program no machine runs)."""
    if platforms is None:
        return None
    if isinstance(platforms, str):
        raise ValueError(f"platforms must be a sequence of names, e.g. ('cpu', 'cuda'), got the string {platforms!r}")
    names = tuple(dict.fromkeys(str(p).strip().lower() for p in platforms))
    bad = [p for p in names if p not in PLATFORMS]
    if bad or not names:
        hint = " ('gpu' is cuda or rocm)" if "gpu" in bad else ""
        raise ValueError(f"unknown platform(s) {', '.join(map(repr, bad)) or '(none given)'}; the platforms are "
                         f"{', '.join(PLATFORMS)}{hint}")
    return names


# --------------------------------------------------------------------------------------------------
# Export


def _check_options(batch, resolution, weights, layout) -> tuple[int, int]:
    if batch is not None and (isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch < 1):
        raise ValueError(f"batch must be a positive int or None (symbolic), got {batch!r}")
    if weights not in WEIGHTS_MODES:
        raise ValueError(f"weights must be one of {WEIGHTS_MODES}, got {weights!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    try:
        h, w = (int(v) for v in resolution)
    except (TypeError, ValueError):
        raise ValueError(f"resolution must be (height, width), got {resolution!r}") from None
    if h < 32 or w < 32 or h % 32 or w % 32:
        near = f"{max(32, round(h / 32) * 32)}x{max(32, round(w / 32) * 32)}"
        raise ValueError(f"resolution {h}x{w} (height x width): both must be positive multiples of 32 "
                         f"(the backbone downsamples 32x), e.g. {near}")
    return h, w


def _with_dtype(model: BiRefNet, dtype):
    """The model itself, or a copy rebuilt with compute dtype `dtype` sharing its arrays (parameters
    stay float32, as `birefnet_jax.load(dtype=...)` builds them)."""
    if dtype is None or jnp.dtype(dtype) == jnp.dtype(model.dtype or jnp.float32):
        return model
    copy = abstract_model(model.cfg, dtype=getattr(jnp, jnp.dtype(dtype).name))
    nnx.update(copy, nnx.state(model))
    return copy


def _forward_fn(model: BiRefNet, *, dtype, uint8_input: bool, layout: str):
    """(forward(weight_leaves, images), names, leaves): the eval forward of a merged copy of the model
    taking its parameters as a flat list, so the caller's model is never switched or changed."""
    graphdef, weights, rest = nnx.split(_with_dtype(model, dtype), (nnx.Param, nnx.BatchStat), ...)
    with_paths, treedef = jax.tree_util.tree_flatten_with_path(weights)
    names = [state_path_name(p) for p, _ in with_paths]
    leaves = [leaf for _, leaf in with_paths]


    def forward(weight_leaves, images):
        state = nnx.merge_state(jax.tree.unflatten(treedef, list(weight_leaves)), rest)
        return eval_forward(graphdef, state, images, uint8=uint8_input, probabilities=uint8_input, layout=layout)

    return forward, names, leaves


def _image_shape(batch, h, w, layout):
    b = jax.export.symbolic_shape("b")[0] if batch is None else int(batch)
    return (b, 3, h, w) if layout == "NCHW" else (b, h, w, 3)


def export_model(model: BiRefNet, *, batch: int | None = 1, resolution: tuple[int, int] | None = None,
                 dtype=None, weights: str = "embedded", layout: str = "NHWC", uint8_input: bool = False,
                 platforms: Sequence[str] | None = None) -> jax.export.Exported:
    """Trace the eval-mode forward with `jax.export` (the caller's model is not changed).

    batch: images per call, or None for a symbolic batch dimension (one program, any batch).
    resolution: (height, width), multiples of 32; default the model's `cfg.resolution`.
    dtype: compute dtype (e.g. `jnp.bfloat16`); default the model's own. Outputs stay float32.
    weights: "embedded" (constants; the program takes `images`) or "argument" (the program takes
      `(weights, images)`, `weights` the flat list of `model_weights(model)` values, in that order).
    layout: "NHWC", or "NCHW" for PyTorch-layout inputs and outputs.
    uint8_input: take uint8 RGB and normalise inside (ImageNet mean/std), return probabilities
      (sigmoid) instead of logits: the serving-friendly signature.
    platforms: lowering platforms, some of `PLATFORMS` (e.g. ("cpu", "cuda")); default the current
      backend.
    """
    resolution = tuple(model.cfg.resolution) if resolution is None else resolution
    h, w = _check_options(batch, resolution, weights, layout)
    platforms = check_platforms(platforms)
    forward, _, leaves = _forward_fn(model, dtype=dtype, uint8_input=uint8_input, layout=layout)
    images = jax.ShapeDtypeStruct(_image_shape(batch, h, w, layout), jnp.uint8 if uint8_input else jnp.float32)
    kwargs = {} if platforms is None else {"platforms": platforms}
    if weights == "embedded":
        def serve(images):
            return forward(leaves, images)

        return jax.export.export(jax.jit(serve), **kwargs)(images)

    def serve(weights, images):
        return forward(weights, images)

    specs = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in leaves]
    return jax.export.export(jax.jit(serve), **kwargs)(specs, images)


def model_weights(model: BiRefNet) -> dict[str, np.ndarray]:
    """The arrays a weights="argument" export takes, by name, in call order."""
    forward, names, leaves = _forward_fn(model, dtype=None, uint8_input=False, layout="NHWC")
    return {n: np.asarray(a) for n, a in zip(names, leaves, strict=True)}


def export_metadata(model: BiRefNet, *, batch: int | None = 1, resolution: tuple[int, int] | None = None,
                    dtype=None, weights: str = "embedded", layout: str = "NHWC",
                    uint8_input: bool = False) -> dict[str, Any]:
    """What `save_exported` records beside the program for these `export_model` options.

    `matmul_precision` is JAX's default matmul precision now: call this where `export_model` runs
    (as `export_to_file` does), since the program keeps the precision it was traced with.
    """
    resolution = tuple(model.cfg.resolution) if resolution is None else resolution
    h, w = _check_options(batch, resolution, weights, layout)
    compute = jnp.dtype(dtype if dtype is not None else (model.dtype or jnp.float32)).name
    return {
        "matmul_precision": str(jax.config.jax_default_matmul_precision or "default"),
        "layout": layout,
        "resolution": [h, w],
        "batch": "symbolic" if batch is None else int(batch),
        "input": "uint8 RGB, 0..255" if uint8_input else "float32 RGB normalised with the ImageNet mean and std",
        "output": "probabilities (sigmoid)" if uint8_input else "logits",
        "uint8_input": bool(uint8_input),
        "compute_dtype": compute,
        "imagenet_mean": IMAGENET_MEAN.tolist(),
        "imagenet_std": IMAGENET_STD.tolist(),
        "config": model.cfg.to_dict(),
    }


# --------------------------------------------------------------------------------------------------
# Files



def _dim(d) -> int | str:
    return int(d) if isinstance(d, (int, np.integer)) else str(d)


def _aval(aval) -> dict[str, Any]:
    return {"shape": [_dim(d) for d in aval.shape], "dtype": jnp.dtype(aval.dtype).name}


def _npz_safe(a: np.ndarray) -> np.ndarray:
    """NumPy cannot store ml_dtypes (bfloat16, ...) in .npz: keep their bits as unsigned ints."""
    a = np.asarray(a)
    if a.dtype.kind == "V" or type(a.dtype).__module__.startswith("ml_dtypes") or a.dtype.name == "bfloat16":
        return a.view(f"u{a.dtype.itemsize}")
    return a


def save_exported(exported: jax.export.Exported, path: str | os.PathLike, *,
                  weights: dict[str, np.ndarray] | None = None, metadata: dict[str, Any] | None = None) -> Path:
    """Write the program (`exported.serialize()`), and beside it the JSON sidecar and, for a
    weights="argument" export, the weights (`weights`: `model_weights(model)`), each atomically.

    `metadata` (e.g. `export_metadata(...)`) is merged into the sidecar. Everything is serialized
    first, then written to temporary files, which are renamed into place (weights, program, sidecar)
    only once all are complete: a failure (e.g. `flatbuffers` missing, a full disk) leaves nothing
    of this call behind, and an earlier export under the same name untouched. Should an overwrite
    be interrupted between the renames, `load_exported` still checks every weight against the
    program's signature.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; give a file path, e.g. {path / 'model.jaxexport'}")
    sidecar, weights_path = sidecar_paths(path)
    takes_weights = exported.in_tree.num_leaves > 1  # (weights, images) rather than (images,)
    n_weights = len(exported.in_avals) - 1
    info: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "program": path.name,
        "platforms": list(exported.platforms),
        "calling_convention_version": exported.calling_convention_version,
        "jax_version": jax.__version__,
        "images": _aval(exported.in_avals[-1]),
        "outputs": _aval(exported.out_avals[0]),
        **(metadata or {}),
        "weights": "argument" if takes_weights else "embedded",
    }
    if takes_weights:
        if weights is None:
            raise ValueError("this program takes its weights as an argument: pass weights=model_weights(model)")
        if len(weights) != n_weights:
            raise ValueError(f"the program takes {n_weights} weight arrays, got {len(weights)}")
        for (name, a), aval in zip(weights.items(), exported.in_avals[:n_weights], strict=True):
            if tuple(np.shape(a)) != tuple(aval.shape) or jnp.dtype(np.asarray(a).dtype) != jnp.dtype(aval.dtype):
                raise ValueError(f"weight {name!r}: {np.shape(a)} {np.asarray(a).dtype} does not match the "
                                 f"program's {aval.shape} {aval.dtype}")
        info["weights_file"] = weights_path.name
        info["weights_order"] = list(weights)
        info["weights_dtypes"] = [jnp.dtype(np.asarray(a).dtype).name for a in weights.values()]
    elif weights is not None:
        raise ValueError("the program has its weights embedded; pass no weights")
    program = exported.serialize()  # needs flatbuffers: fails here, before any file is touched
    text = (json.dumps(info, indent=1) + "\n").encode()
    files: list[tuple[Path, Callable[[Any], None]]] = [(path, lambda f: f.write(program)),
                                                        (sidecar, lambda f: f.write(text))]
    if takes_weights:
        arrays = {name: _npz_safe(a) for name, a in weights.items()}
        files.insert(0, (weights_path, lambda f: np.savez(f, **arrays)))
    created = _missing_folders(path.parent)
    try:
        with atomic_paths([target for target, _ in files]) as tmps:
            for tmp, (_, write) in zip(tmps, files, strict=True):
                with open(tmp, "wb") as f:
                    write(f)
    except BaseException:
        for folder in created:  # the folders this call made, if it left them empty
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    if not takes_weights and weights_path.exists():  # left by an earlier weights="argument" export
        weights_path.unlink()
    return path


def _missing_folders(folder: Path) -> list[Path]:
    """`folder` and its missing parents, deepest first (what creating it would make)."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


def export_to_file(model: BiRefNet, path: str | os.PathLike, **options) -> Path:
    """`export_model` + `save_exported` in one call; `options` are `export_model`'s."""
    exported = export_model(model, **options)
    metadata = export_metadata(model, **{k: v for k, v in options.items() if k != "platforms"})
    weights = model_weights(model) if options.get("weights") == "argument" else None
    return save_exported(exported, path, weights=weights, metadata=metadata)


# --------------------------------------------------------------------------------------------------
# TensorFlow SavedModel


def _replace_dir(new: Path, directory: Path) -> None:
    if directory.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old-", dir=directory.parent))
        old.rmdir()
        directory.rename(old)
        new.rename(directory)
        shutil.rmtree(old)
    else:
        new.rename(directory)


def export_saved_model(model: BiRefNet, directory: str | os.PathLike, *, batch: int | None = 1,
                       resolution: tuple[int, int] | None = None, dtype=None, layout: str = "NHWC",
                       uint8_input: bool = False, platforms: Sequence[str] | None = None,
                       overwrite: bool = False) -> Path:
    """A TF SavedModel of the same forward (via `jax2tf`, native serialization), serving signature
    `serving_default`: input `images`, output `logits` (or `probabilities` with `uint8_input`).

    The weights are TF variables (stored in `variables/`, not in the graph), whatever the size.
    Written into a temporary folder and renamed when complete; `overwrite` replaces only a
    folder that is a SavedModel. Needs TensorFlow (`pip install 'birefnet-jax[train]'`).
    """
    tf = require("tensorflow", "export_saved_model (TF SavedModel export)")
    from jax.experimental import jax2tf  # optional: imports TensorFlow, so only when a SavedModel is asked for

    directory = Path(directory).absolute()
    if directory.exists():
        if not overwrite:
            raise FileExistsError(f"{directory} exists (use --force / overwrite=True to replace it)")
        if not (directory / "saved_model.pb").exists():
            raise FileExistsError(f"{directory} exists and is not a SavedModel; not replacing it")
    resolution = tuple(model.cfg.resolution) if resolution is None else resolution
    h, w = _check_options(batch, resolution, "argument", layout)
    platforms = check_platforms(platforms)
    forward, names, leaves = _forward_fn(model, dtype=dtype, uint8_input=uint8_input, layout=layout)
    shape = (None, 3, h, w) if layout == "NCHW" else (None, h, w, 3)
    if batch is not None:
        shape = (int(batch), *shape[1:])
    poly = "(b, 3, {h}, {w})" if layout == "NCHW" else "(b, {h}, {w}, 3)"
    tf_forward = jax2tf.convert(forward, with_gradient=False,
                                polymorphic_shapes=[None, poly.format(h=h, w=w) if batch is None else None],
                                native_serialization_platforms=tuple(platforms) if platforms else None)
    module = tf.Module()
    module.weights = [tf.Variable(np.asarray(a), trainable=False, name=n) for n, a in zip(names, leaves, strict=True)]
    out_name = "probabilities" if uint8_input else "logits"

    @tf.function(autograph=False, input_signature=[
        tf.TensorSpec(shape, tf.uint8 if uint8_input else tf.float32, name="images")])
    def serve(images):
        return {out_name: tf_forward(module.weights, images)}

    module.serve = serve
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
    try:
        os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes 0700
        tf.saved_model.save(module, str(tmp), signatures={"serving_default": serve})
        meta = export_metadata(model, batch=batch, resolution=(h, w), dtype=dtype, weights="argument",
                               layout=layout, uint8_input=uint8_input)
        meta.update(format=FORMAT + "-savedmodel", format_version=FORMAT_VERSION, signature="serving_default",
                    input_name="images", output_name=out_name, weights="variables")
        (tmp / "birefnet_export.json").write_text(json.dumps(meta, indent=1) + "\n")
        _replace_dir(tmp, directory)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return directory


__all__ = [
    "check_platforms",
    "export_metadata",
    "export_model",
    "export_saved_model",
    "export_to_file",
    "load_exported",
    "model_weights",
    "save_exported",
    "sidecar_paths",
]
