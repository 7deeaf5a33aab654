"""Validation during training: the DIS metrics of the model being trained on a small held-out set,
a picture to look at, and the predicted masks.

`Validator` is built once from the validation pairs (`folders.find_pairs`). It decodes them once and
keeps them in memory: every image resized to the validation size (uint8, OpenCV's bilinear
``INTER_LINEAR`` as the original's test loader and this project's inference resize), every ground
truth at its own size (uint8), and, when HCE is asked for, the ground truth's skeleton (as flat
indices, it is thin). Memory is about ``N * (h * w * 3 + ground-truth pixels)`` bytes, so keep the set
small (a few hundred images at most).

``validator(model)`` then, for every batch of ``batch_size`` images (the last one padded, so exactly
one program is compiled per model architecture), runs the model's eval-mode forward, takes the
sigmoid, resizes each probability map back to its ground truth's size (bilinear with aligned
corners, as `birefnet_jax.predict` does), truncates it to uint8 (as the original saves predictions)
and scores it with `birefnet_jax.metrics` (the original evaluator's numbers). It returns means over
the set as plain floats, keyed ``val/S``, ``val/wF``, ``val/MAE``, ``val/HCE``, ...; `HIGHER_IS_BETTER`
says which way each one improves (`is_better` compares).

The training model is neither copied nor left switched: for the duration of the split (no device
work) every module's ``deterministic`` / ``use_running_average`` attribute is set to eval mode, the
graph definition and the (un-copied) state are taken, and the attributes are put back exactly as
they were, module by module (`eval_mode`), so a model in training mode with BatchNorm frozen by
`batchnorm.set_train_mode` comes back that way. The graph definition is always the eval-mode one,
so switching BatchNorm modes between validations does not recompile.

Several devices and processes: pass ``batch_sharding`` (a `jax.sharding.NamedSharding` of the
training mesh whose spec shards the first axis, e.g. ``PartitionSpec('data')``). Each batch is then
laid out over the mesh and the probabilities come back replicated. Every process validates the
*whole* set, in the same order, and computes the same metrics (simple and deterministic, no
gathering of per-image results); only the images of each batch are split over the devices. Log and
save on process 0 only. `batch_size` must be a multiple of the number of shards of the batch axis,
and the model's state must live on the same mesh (as the training state does). Without
``batch_sharding`` the batch goes in as a host array and the program runs where the state is.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image, ImageDraw, ImageFont

from birefnet_jax.io.files import atomic_path
from birefnet_jax.io.masks import mask_to_uint8, write_png
from birefnet_jax.io.resize import resize_align_corners, resize_linear
from birefnet_jax.metrics import ALL_METRICS, Evaluator, evaluate_pair, skeleton_of
from birefnet_jax.model import eval_forward
from birefnet_jax.train.data.folders import Pair, load_image, load_mask

# Metric switches of `birefnet_jax.metrics` (the original's names) validated by default.
DEFAULT_METRICS: tuple[str, ...] = ("S", "WF", "MAE", "HCE")
DEFAULT_PREFIX = "val/"

# Which way each reported number improves (keys without the prefix).
HIGHER_IS_BETTER: dict[str, bool] = {
    "S": True,
    "wF": True,
    "MAE": False,
    "MSE": False,
    "HCE": False,
    "MBA": True,
    "E_adp": True,
    "maxE": True,
    "meanE": True,
    "F_adp": True,
    "maxF": True,
    "meanF": True,
    "maxBIoU": True,
    "meanBIoU": True,
}

# The attributes that `nnx.Module.train()` / `.eval()` flip.
MODE_ATTRIBUTES: tuple[str, ...] = ("deterministic", "use_running_average")

_ALIASES = {"wF": "WF", "wf": "WF", "Smeasure": "S", "mae": "MAE", "hce": "HCE"}

def _metric_key(name: str) -> str:
    return name.split("/")[-1]


def is_better(name: str, value: float, best: float | None) -> bool:
    """Whether `value` of metric `name` (``'val/S'`` or ``'S'``) improves on `best` (None: yes)."""
    if best is None:
        return True
    key = _metric_key(name)
    if key not in HIGHER_IS_BETTER:
        raise KeyError(f"unknown metric {name!r}; known: {sorted(HIGHER_IS_BETTER)}")
    return value > best if HIGHER_IS_BETTER[key] else value < best


# --------------------------------------------------------------------------------------------------
# Modes


def module_modes(model: nnx.Module) -> dict[str, dict[str, Any]]:
    """Every module's ``deterministic`` / ``use_running_average`` attributes, by graph path."""
    out: dict[str, dict[str, Any]] = {}
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Module):
            attrs = {a: vars(node)[a] for a in MODE_ATTRIBUTES if a in vars(node)}
            if attrs:
                out["/".join(map(str, path))] = attrs
    return out


@contextlib.contextmanager
def eval_mode(model: nnx.Module) -> Iterator[nnx.Module]:
    """`model` in eval mode inside the block; afterwards (also after an error) every module's mode
    attributes are exactly what they were before, module by module (not ``model.train()``, which
    would also unfreeze BatchNorm)."""
    saved = []
    for _, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Module):
            attrs = {a: vars(node)[a] for a in MODE_ATTRIBUTES if a in vars(node)}
            if attrs:
                saved.append((node, attrs))
    try:
        model.eval()
        yield model
    finally:
        for node, attrs in saved:
            for name, value in attrs.items():
                setattr(node, name, value)


# --------------------------------------------------------------------------------------------------
# The validator


def _forward(graphdef, counter: list[int], state, images):
    """uint8 (B, h, w, 3) -> float32 probabilities (B, h, w): the package's one eval-mode forward."""
    counter[0] += 1  # runs once per trace
    return eval_forward(graphdef, state, images, uint8=True, probabilities=True)[..., 0].astype(jnp.float32)


@dataclasses.dataclass
class ValidationResult:
    """What one validation produced.

    ``metrics``: means over the set, prefixed (``'val/S'``, ...). ``preds``: the uint8 prediction of
    each pair at its ground truth's size, in the order of the pairs. ``per_image``: the
    `birefnet_jax.metrics.PairResult` of each pair (None from `Validator.predict`).
    """

    metrics: dict[str, float]
    preds: list[np.ndarray]
    per_image: list[Any] | None
    seconds: float


class Validator:
    """Validation metrics of a model on a fixed, in-memory set of image/mask pairs.

    Args:
      pairs: the validation pairs (`folders.Pair`, e.g. from `find_pairs`).
      size: (height, width) the images are resized to, each a multiple of 32.
      batch_size: images per forward; the last batch is padded to it (one compilation).
      metrics: switches of `birefnet_jax.metrics.ALL_METRICS` ('S', 'MAE', 'MSE', 'WF', 'HCE', 'MBA',
        'E', 'F', 'BIoU'); default S-measure, weighted F, MAE and HCE.
      batch_sharding: optional `NamedSharding` putting each batch on a mesh (see the module doc).
      prefix: prepended to the reported names.
      workers: threads that decode the set and score predictions (default: the CPUs, at most 8).
    """

    def __init__(
        self,
        pairs: Sequence[Pair],
        size: tuple[int, int],
        batch_size: int = 1,
        metrics: Sequence[str] = DEFAULT_METRICS,
        *,
        batch_sharding: jax.sharding.NamedSharding | None = None,
        prefix: str = DEFAULT_PREFIX,
        workers: int | None = None,
    ):
        self.pairs = tuple(pairs)
        if not self.pairs:
            raise ValueError("no validation pairs")
        h, w = (int(v) for v in size)
        if h < 32 or w < 32 or h % 32 or w % 32:
            raise ValueError(f"validation size {tuple(size)} must be (height, width), each a positive multiple of 32")
        self.size = (h, w)
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)
        chosen = [_ALIASES.get(m, m) for m in metrics]
        unknown = sorted(set(chosen) - set(ALL_METRICS))
        if unknown or not chosen:
            raise ValueError(f"unknown metrics {unknown or list(metrics)}; choose from {list(ALL_METRICS)}")
        self.metrics = tuple(dict.fromkeys(chosen))
        self.batch_sharding = batch_sharding
        if batch_sharding is not None:
            try:
                batch_sharding.shard_shape((self.batch_size, h, w, 3))
            except ValueError as e:
                raise ValueError(f"batch_size {self.batch_size} does not split over the batch sharding "
                                 f"{batch_sharding.spec} of mesh {dict(batch_sharding.mesh.shape)}: {e}") from None
        self.prefix = prefix
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        self.workers = max(1, workers or min(8, cpus))
        self._programs: list[tuple[Any, Callable]] = []  # (graphdef, jitted); graph defs do not hash
        self._traces = [0]

        def decode(pair: Pair):
            image = resize_linear(load_image(pair.image), self.size)
            gt = load_mask(pair.mask)
            skeleton = None
            if "HCE" in self.metrics:
                skeleton = np.flatnonzero(skeleton_of(gt)).astype(np.int64)
            return image, gt, skeleton

        with ThreadPoolExecutor(self.workers) as pool:
            decoded = list(pool.map(decode, self.pairs))
        self.images = np.stack([d[0] for d in decoded])  # (N, h, w, 3) uint8
        self.gts = [d[1] for d in decoded]  # uint8 (H_i, W_i)
        self._skeletons = [d[2] for d in decoded]
        self.stems = [p.stem for p in self.pairs]

    def __len__(self) -> int:
        return len(self.pairs)

    @property
    def trace_count(self) -> int:
        """How many times the forward was traced (= compiled): one per model architecture."""
        return self._traces[0]

    @property
    def higher_is_better(self) -> dict[str, bool]:
        """Direction of each reported name (prefixed) for the chosen metrics."""
        return {self.prefix + k: HIGHER_IS_BETTER[k] for k in self._reported_keys()}

    def _reported_keys(self) -> list[str]:
        keys = {"S": ["S"], "MAE": ["MAE"], "MSE": ["MSE"], "WF": ["wF"], "HCE": ["HCE"], "MBA": ["MBA"],
                "E": ["maxE", "meanE", "E_adp"], "F": ["maxF", "meanF", "F_adp"], "BIoU": ["maxBIoU", "meanBIoU"]}
        return [k for m in self.metrics for k in keys[m]]

    def skeleton(self, index: int) -> np.ndarray | None:
        """The ground-truth skeleton of pair `index` (bool, full size), if HCE is validated."""
        flat = self._skeletons[index]
        if flat is None:
            return None
        out = np.zeros(self.gts[index].size, bool)
        out[flat] = True
        return out.reshape(self.gts[index].shape)

    # -- device side

    def _program(self, graphdef):
        fn = next((f for g, f in self._programs if g == graphdef), None)
        if fn is None:
            body = functools.partial(_forward, graphdef, self._traces)
            if self.batch_sharding is not None:
                replicated = jax.sharding.NamedSharding(self.batch_sharding.mesh, jax.sharding.PartitionSpec())
                fn = jax.jit(body, out_shardings=replicated)
            else:
                fn = jax.jit(body)
            self._programs.append((graphdef, fn))
        return fn

    def _put(self, batch: np.ndarray):
        if self.batch_sharding is None:
            return batch
        # Every process holds the whole batch: each fills the shards its devices own.
        return jax.make_array_from_callback(batch.shape, self.batch_sharding, lambda index: batch[index])

    def _batches(self) -> Iterator[tuple[int, np.ndarray]]:
        n, b = len(self), self.batch_size
        for start in range(0, n, b):
            batch = self.images[start : start + b]
            if batch.shape[0] < b:  # pad the last batch: one shape, one program
                pad = np.zeros((b - batch.shape[0],) + batch.shape[1:], batch.dtype)
                batch = np.concatenate([batch, pad])
            yield start, batch

    def probabilities(self, model: nnx.Module) -> Iterator[tuple[int, np.ndarray]]:
        """(first index, float32 probabilities (k, h, w) at the validation size) per batch, padding
        dropped; one batch is computed ahead of the one handed out."""
        with eval_mode(model):
            graphdef, state = nnx.split(model)
        program = self._program(graphdef)
        pending = None
        for start, batch in self._batches():
            out = program(state, self._put(batch))  # dispatched, not awaited
            if pending is not None:
                yield pending[0], self._fetch(*pending)
            pending = (start, out)
        if pending is not None:
            yield pending[0], self._fetch(*pending)

    def _fetch(self, start: int, out) -> np.ndarray:
        k = min(self.batch_size, len(self) - start)
        return np.asarray(out)[:k]

    # -- host side

    def _to_uint8(self, index: int, prob_small: np.ndarray) -> np.ndarray:
        return mask_to_uint8(resize_align_corners(prob_small, self.gts[index].shape))

    def _score(self, index: int, pred: np.ndarray):
        return evaluate_pair(pred, self.gts[index], self.metrics, self.skeleton(index), self.stems[index])

    def _run(self, model: nnx.Module, score: bool) -> ValidationResult:
        start_time = time.perf_counter()

        def finish(index: int, prob_small: np.ndarray):
            pred = self._to_uint8(index, prob_small)
            return pred, (self._score(index, pred) if score else None)

        with ThreadPoolExecutor(self.workers) as pool:
            futures = [pool.submit(finish, start + i, prob)
                       for start, probs in self.probabilities(model) for i, prob in enumerate(probs)]
            done = [f.result() for f in futures]
        preds = [d[0] for d in done]
        per_image = [d[1] for d in done] if score else None
        metrics = self.summarise(per_image) if score else {}
        return ValidationResult(metrics, preds, per_image, time.perf_counter() - start_time)

    def summarise(self, per_image: Sequence[Any]) -> dict[str, float]:
        """Means over `PairResult`s, as the original evaluator takes them, under the reported names."""
        ev = Evaluator(self.metrics)
        for r in per_image:
            ev.add(r)
        results = ev.results()
        return {self.prefix + k: float(results[k]) for k in self._reported_keys()}

    def evaluate(self, preds: Sequence[np.ndarray]) -> dict[str, float]:
        """The reported metrics of uint8 predictions (one per pair, at its ground truth's size)."""
        if len(preds) != len(self):
            raise ValueError(f"{len(preds)} predictions for {len(self)} validation pairs")
        with ThreadPoolExecutor(self.workers) as pool:
            per_image = list(pool.map(self._score, range(len(self)), preds))
        return self.summarise(per_image)

    def predict(self, model: nnx.Module) -> list[np.ndarray]:
        """The uint8 prediction of every pair at its ground truth's size (no metrics)."""
        return self._run(model, score=False).preds

    def run(self, model: nnx.Module) -> ValidationResult:
        """Predictions, per-image results and the reported means."""
        return self._run(model, score=True)

    def __call__(self, model: nnx.Module) -> dict[str, float]:
        """The reported means (``{'val/S': ..., 'val/wF': ..., ...}``)."""
        return self.run(model).metrics

    def save_comparison(self, path: str | os.PathLike, preds: Sequence[np.ndarray], *, count: int = 8,
                        max_side: int = 256) -> Path:
        """`save_comparison` of the first `count` pairs, tiles at most `max_side` pixels on a side."""
        count = max(1, min(count, len(self)))
        h, w = self.size
        scale = min(1.0, max_side / max(h, w))
        tile = (max(1, round(h * scale)), max(1, round(w * scale)))
        return save_comparison(path, self.images[:count], self.gts[:count], list(preds)[:count], tile=tile,
                               names=self.stems[:count])

    def write_predictions(self, folder: str | os.PathLike, preds: Sequence[np.ndarray], **kwargs) -> list[Path]:
        """`write_predictions` of this set's pairs."""
        return write_predictions(folder, self.pairs, preds, **kwargs)


# --------------------------------------------------------------------------------------------------
# Pictures and files


def _as_uint8_map(a, what: str) -> np.ndarray:
    """uint8 as is, floats in [0, 1] truncated to 0..255 (as the original saves predictions)."""
    a = np.asarray(a)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.dtype == np.uint8:
        return a
    if np.issubdtype(a.dtype, np.floating):
        return mask_to_uint8(a.astype(np.float32))
    if a.dtype == np.bool_:
        return a.astype(np.uint8) * np.uint8(255)
    raise TypeError(f"{what} must be uint8, bool or float in [0, 1], got {a.dtype}")


def _tile(array: np.ndarray, tile: tuple[int, int]) -> Image.Image:
    img = Image.fromarray(np.ascontiguousarray(array)).convert("RGB")
    if img.size != (tile[1], tile[0]):
        img = img.resize((tile[1], tile[0]), Image.Resampling.BILINEAR)
    return img


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    while text and draw.textlength(text, font=font) > width:
        text = text[:-1]
    return text


def save_comparison(
    path: str | os.PathLike,
    images: Sequence[np.ndarray],
    gts: Sequence[np.ndarray],
    preds: Sequence[np.ndarray],
    columns: Sequence[str] = ("input", "ground truth", "prediction"),
    *,
    tile: tuple[int, int] | None = None,
    names: Sequence[str] | None = None,
    label_height: int = 16,
    gap: int = 2,
) -> Path:
    """A PNG grid, one row per image: input, ground truth and prediction side by side, under a
    header of column labels; written atomically (temporary file, then rename).

    Every tile is (height, width) `tile` (default: the first image's size; other sizes are resized
    bilinearly). The picture is ``label_height + rows * h + (rows - 1) * gap`` high and
    ``3 * w + 2 * gap`` wide, on a dark grey background. `names` (optional) are written in the
    corner of each input tile. Images are (H, W, 3) uint8 RGB (or grey); ground truths and
    predictions uint8, or float in [0, 1].
    """
    rows = len(images)
    if not rows or len(gts) != rows or len(preds) != rows:
        raise ValueError(f"need as many ground truths and predictions as images (>= 1), got {rows} images, "
                         f"{len(gts)} ground truths and {len(preds)} predictions")
    if len(columns) != 3:
        raise ValueError(f"columns names the 3 columns (input, ground truth, prediction), got {list(columns)}")
    if names is not None and len(names) != rows:
        raise ValueError(f"{len(names)} names for {rows} rows")
    first = np.asarray(images[0])
    th, tw = (int(v) for v in (tile or first.shape[:2]))
    cols = 3
    width = cols * tw + (cols - 1) * gap
    height = label_height + rows * th + (rows - 1) * gap
    canvas = Image.new("RGB", (width, height), (48, 48, 48))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for c, label in enumerate(columns):
        x = c * (tw + gap)
        draw.text((x + 2, 2), _fit(draw, str(label), font, tw - 4), fill=(255, 255, 255), font=font)
    for r in range(rows):
        y = label_height + r * (th + gap)
        image = np.asarray(images[r])
        if image.dtype != np.uint8:
            raise TypeError(f"images must be uint8, got {image.dtype}")
        tiles = [_tile(image, (th, tw)), _tile(_as_uint8_map(gts[r], "ground truths"), (th, tw)),
                 _tile(_as_uint8_map(preds[r], "predictions"), (th, tw))]
        if names is not None:
            td = ImageDraw.Draw(tiles[0])
            text = _fit(td, str(names[r]), font, tw - 4)
            if text:
                box = td.textbbox((2, 1), text, font=font)
                td.rectangle((0, 0, box[2] + 2, box[3] + 2), fill=(0, 0, 0))
                td.text((2, 1), text, fill=(255, 255, 255), font=font)
        for c, t in enumerate(tiles):
            canvas.paste(t, (c * (tw + gap), y))
    path = Path(path)
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")
    return path


def write_predictions(
    folder: str | os.PathLike,
    pairs: Sequence[Pair],
    probs: Sequence[np.ndarray],
    *,
    by_set: bool = False,
) -> list[Path]:
    """Masks as ``<folder>/<stem>.png`` (``<folder>/<set>/<stem>.png`` with `by_set`, the layout the
    original's evaluation reads), each written atomically. `probs` are uint8 masks, or floats in
    [0, 1] (truncated to 0..255 as the original saves them), one per pair."""
    if len(pairs) != len(probs):
        raise ValueError(f"{len(probs)} predictions for {len(pairs)} pairs")
    folder = Path(folder)
    paths = [folder / p.set_name / f"{p.stem}.png" if by_set else folder / f"{p.stem}.png" for p in pairs]
    seen: dict[Path, int] = {}
    for p in paths:
        seen[p] = seen.get(p, 0) + 1
    dups = sorted(str(p) for p, k in seen.items() if k > 1)
    if dups:
        hint = "" if by_set else " (pairs from several sets share stems: use by_set=True)"
        raise ValueError(f"several predictions would be written to {', '.join(dups[:5])}{hint}")
    for path, prob in zip(paths, probs, strict=True):
        write_png(path, _as_uint8_map(prob, "predictions"))
    return paths


__all__ = [
    "DEFAULT_METRICS",
    "HIGHER_IS_BETTER",
    "MODE_ATTRIBUTES",
    "ValidationResult",
    "Validator",
    "eval_mode",
    "is_better",
    "module_modes",
    "save_comparison",
    "write_predictions",
]
