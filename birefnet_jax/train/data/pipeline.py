"""The training input pipeline: a deterministic, resumable, sharded stream of batches, built on Grain.

What step ``s`` of a run gets, on every process:

- Order. Epoch ``e`` visits the data set in a permutation drawn from ``(seed, e)`` alone. The
  stream of global example positions ``0, 1, 2, ...`` walks epoch 0's permutation, then epoch 1's,
  and so on, each epoch cut to ``steps_per_epoch * global_batch_size`` examples (the original's
  ``drop_last``: the incomplete last batch of an epoch is dropped, and which examples fall in it
  changes from epoch to epoch). Step ``s`` takes positions ``[s * G, (s + 1) * G)``; process ``p``
  of ``P`` takes the contiguous slice ``[s * G + p * B, s * G + (p + 1) * B)``, ``B = G / P``, and
  reads only the files of its own slice.
- Size. ``sizes.size_for_step(seed, s)``: one (height, width) for the whole global batch.
- Per example: decode (RGB; masks 8-bit grey, see `folders.load_image` / `load_mask`), augment with
  ``np.random.Generator(np.random.PCG64([seed, 1, position]))`` (so an example's augmentation
  depends on its global position only, not on the number of processes, threads or workers),
  resize image and mask to the batch's size with PIL's bilinear filter (what torchvision's
  ``Resize`` does to the PIL images of the original), then ``image / 255`` normalised with the
  ImageNet mean and std and ``mask / 255``.

  With one fixed size (``resize_before_augment=None`` and a single bucket), the resize comes
  before the augmentation instead, as the original does when ``dynamic_size`` is off (its loader
  resizes to ``size`` on reading); augmenting a 1024x1024 image is also much cheaper than a
  4000x3000 one. A crop then changes the size, and a second resize restores it.

Everything is a pure function of (seed, step, position), so a run restarted with
``start_step=k`` yields exactly the batches an uninterrupted run yields from step k on, on any
number of threads or worker processes.

Parallelism. With ``worker_count=0`` (default), ``num_threads`` threads of this process decode,
augment and resize single examples (PIL and NumPy release the GIL for the heavy parts), and
another thread stacks them into batches, so taking a batch from the iterator is a queue pop.
With ``worker_count > 0``, Grain worker processes each build whole batches (interleaved in step
order) and hand them over through shared memory: use that when augmentation in Python threads
cannot keep up. Worker processes are spawned, so ``data`` and ``augment`` must pickle (with
cloudpickle); a folder data set and the default augmentation do. Workers run with
``JAX_PLATFORMS=cpu`` (they must never claim an accelerator), and since Grain reads absl flags in
them, flags nobody parsed are marked parsed (defaults), as absl.app.run would have done.
`TrainPipeline.dataset` gives the Grain ``IterDataset`` itself, for Grain's own checkpointing or
further transformations.

Batches are dicts of NumPy arrays: ``image`` float32 (B, H, W, 3), ``mask`` float32 (B, H, W, 1)
in [0, 1], ``class_label`` int32 (B,) (-1 without class labels), and with ``with_indices=True``
also ``example_index`` int64 (B,), the index of each example in ``data``.

Data sources. ``data`` is a list of `folders.Pair` (from `folders.find_pairs`), or any object with
``__len__`` and ``load(index) -> (image uint8 (H, W, 3), mask uint8 (H, W), class_label)``, such as
`tfds_builder.TfdsSource` over a built TensorFlow Datasets data set.

Permutations use NumPy's ``Generator.permutation``; NumPy keeps its streams stable in practice but
does not promise it across versions, so give every host of a run the same NumPy.
"""

from __future__ import annotations

import atexit
import gc
import operator
import os
import threading
import weakref
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
from PIL import Image

from birefnet_jax.io.images import normalize
from birefnet_jax.train.data.augment import augment as default_augment
from birefnet_jax.train.data.folders import DatasetError, Pair, load_image, load_mask
from birefnet_jax.train.data.sizes import TrainingSizes

# Streams of randomness, each keyed by [seed, stream, n] (sizes.py uses stream 2 for batch sizes).
_PERMUTATION_STREAM = 0
_AUGMENT_STREAM = 1

# Grain's ranges need an end that fits a length (a C ssize_t): this many examples is "for ever".
_FOREVER = 1 << 62

Augment = Callable[[np.ndarray, np.ndarray, np.random.Generator], tuple[np.ndarray, np.ndarray]]


class _DefaultAugment:
    def __repr__(self) -> str:
        return "DEFAULT_AUGMENT"


# `augment=DEFAULT_AUGMENT`: birefnet_jax.train.data.augment.augment with its defaults (the
# original's flip, enhance, rotate, pepper). Pass functools.partial(augment, methods=...,
# background_synthesis=True) for other settings, or None for no augmentation.
DEFAULT_AUGMENT: Any = _DefaultAugment()


@runtime_checkable
class ExampleSource(Protocol):
    """Random access to training examples: what the pipeline reads."""

    def __len__(self) -> int: ...

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray, int]:
        """(image uint8 (H, W, 3), mask uint8 (H, W), class label or -1) of example `index`."""
        ...


class FolderSource:
    """Examples from image/mask files (`folders.find_pairs`)."""

    def __init__(self, pairs: Sequence[Pair]):
        self.pairs = tuple(pairs)
        bad = [p for p in self.pairs if not isinstance(p, Pair)]
        if bad:
            raise TypeError(f"FolderSource takes folders.Pair items, got {type(bad[0]).__name__}")

    def __len__(self) -> int:
        return len(self.pairs)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray, int]:
        pair = self.pairs[index]
        image, mask = load_image(pair.image), load_mask(pair.mask)
        if image.shape[:2] != mask.shape:
            raise DatasetError(
                "an image and its mask differ in size (folders.check_files finds all such pairs)",
                [f"{pair.image} is {image.shape[1]}x{image.shape[0]}, {pair.mask} is {mask.shape[1]}x{mask.shape[0]}"],
            )
        return image, mask, pair.class_label


def steps_per_epoch(num_examples: int, global_batch_size: int) -> int:
    """Full global batches in one pass over the data (the incomplete last one is dropped)."""
    return num_examples // global_batch_size


def _index(value, name: str, minimum: int = 0) -> int:
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {value!r}") from None
    if v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v}")
    return v


def _available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def resize_pair(image: np.ndarray, mask: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Image (H, W, 3) and mask (H, W), uint8, to (height, width) `size` with PIL's bilinear filter
    (antialiased when shrinking, as torchvision's ``Resize`` on PIL images); unchanged if already."""
    h, w = size
    if image.shape[:2] != (h, w):
        image = np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize((w, h), Image.Resampling.BILINEAR))
    if mask.shape != (h, w):
        mask = np.asarray(Image.fromarray(np.ascontiguousarray(mask)).resize((w, h), Image.Resampling.BILINEAR))
    return image, mask


def mask_to_float(mask: np.ndarray) -> np.ndarray:
    """uint8 (H, W) to float32 (H, W, 1) in [0, 1]."""
    x = mask.astype(np.float32)
    x /= np.float32(255)
    return x[..., None]


def stack_examples(examples: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


class _Examples:
    """The work behind every example: a pure function of the stream position, picklable (for
    Grain's worker processes), safe to call from many threads."""

    def __init__(
        self,
        source: ExampleSource,
        *,
        global_batch_size: int,
        local_batch_size: int,
        process_index: int,
        seed: int,
        sizes: TrainingSizes,
        augment: Augment | None,
        resize_first: bool,
        with_indices: bool,
    ):
        self.source = source
        self.num_examples = len(source)
        self.global_batch_size = global_batch_size
        self.local_batch_size = local_batch_size
        self.process_index = process_index
        self.seed = seed
        self.sizes = sizes
        self.augment = augment
        self.resize_first = resize_first
        self.with_indices = with_indices
        self.epoch_length = steps_per_epoch(self.num_examples, global_batch_size) * global_batch_size
        self._init_cache()

    def _init_cache(self) -> None:
        self._lock = threading.Lock()
        self._permutations: dict[int, np.ndarray] = {}

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        del state["_lock"], state["_permutations"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._init_cache()

    def permutation(self, epoch: int) -> np.ndarray:
        with self._lock:
            perm = self._permutations.get(epoch)
            if perm is None:
                rng = np.random.Generator(np.random.PCG64([self.seed, _PERMUTATION_STREAM, epoch]))
                perm = rng.permutation(self.num_examples)
                self._permutations[epoch] = perm
                if len(self._permutations) > 3:  # threads may straddle an epoch boundary; keep a few
                    del self._permutations[min(self._permutations)]
            return perm

    def position(self, step: int, k: int) -> int:
        """Global stream position of this process's k-th example of step `step`."""
        return step * self.global_batch_size + self.process_index * self.local_batch_size + k

    def index_at(self, position: int) -> int:
        epoch, offset = divmod(position, self.epoch_length)
        return int(self.permutation(epoch)[offset])

    def example(self, step: int, k: int) -> dict[str, np.ndarray]:
        position = self.position(step, k)
        index = self.index_at(position)
        image, mask, label = self.source.load(index)
        size = self.sizes.size_for_step(self.seed, step)
        if self.resize_first:
            image, mask = resize_pair(image, mask, size)
        if self.augment is not None:
            rng = np.random.Generator(np.random.PCG64([self.seed, _AUGMENT_STREAM, position]))
            image, mask = self.augment(image, mask, rng)
            if image.ndim != 3 or image.shape[2] != 3 or image.shape[:2] != mask.shape:
                raise ValueError(
                    f"the augmentation returned an image of shape {image.shape} and a mask of shape {mask.shape}; "
                    "expected (H, W, 3) and (H, W)"
                )
        image, mask = resize_pair(image, mask, size)
        out = {
            "image": normalize(image),
            "mask": mask_to_float(mask),
            "class_label": np.int32(label),
        }
        if self.with_indices:
            out["example_index"] = np.int64(index)
        return out

    def element(self, local_position: int) -> dict[str, np.ndarray]:
        """Example number `local_position` of this process's stream (B per step, in order)."""
        step, k = divmod(local_position, self.local_batch_size)
        return self.example(step, k)

    def batch(self, step: int) -> dict[str, np.ndarray]:
        return stack_examples([self.example(step, k) for k in range(self.local_batch_size)])


def _import_grain():
    try:
        import grain
    except ImportError as e:
        raise ImportError(
            "the training input pipeline needs Grain: pip install grain (or birefnet-jax[train])"
        ) from e
    return grain


def _absl_flags_usable() -> None:
    """Grain's worker processes read absl flags; without absl.app.run nobody parsed them, and the
    read fails. Mark them parsed (all defaults), as absl documents for programs that parse no
    command line."""
    try:
        from absl import flags
    except ImportError:
        return
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _worker_init(worker_index: int, worker_count: int) -> None:
    """Keep Grain's worker processes off the accelerators: if anything in them initialised JAX, it
    must not take GPU memory or open a TPU that the training process holds."""
    os.environ["JAX_PLATFORMS"] = "cpu"


_OPEN_ITERATORS: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_open_iterators() -> None:
    for it in list(_OPEN_ITERATORS):
        it.close()


class TrainIterator:
    """Batches from step `step` on; `step` is the step of the next batch. Close it (or use it as a
    context manager) to stop the threads or worker processes before it is garbage-collected."""

    def __init__(self, iterator, start_step: int):
        self._iterator = iterator
        self.step = start_step
        _OPEN_ITERATORS.add(self)

    def __iter__(self) -> TrainIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._iterator is None:
            raise StopIteration
        batch = next(self._iterator)
        self.step += 1
        return batch

    def close(self) -> None:
        iterator, self._iterator = self._iterator, None
        close = getattr(iterator, "close", None)
        if close is not None:
            close()
        # Grain's iterators close their parents again when collected; collect them now, while the
        # interpreter is whole (at exit that second close fails with a traceback).
        del iterator
        gc.collect()

    def __enter__(self) -> TrainIterator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class TrainPipeline:
    """The training batches of one process (see the module docstring for what each step holds).

    data: list of `folders.Pair`, or an `ExampleSource`.
    global_batch_size: examples per step over all processes; divisible by `process_count`.
    sizes: the training resolutions (`TrainingSizes.fixed()`, `TrainingSizes.dynamic()`, ...).
    seed: a non-negative int; order, sizes and augmentation all follow from it.
    process_index, process_count: this process and how many there are (default: JAX's).
    augment: ``augment(image, mask, rng) -> (image, mask)`` on uint8 arrays; DEFAULT_AUGMENT is the
      original's default augmentation, None none.
    resize_before_augment: resize to the batch size before augmenting (True) or after (False);
      None: before for a single fixed size, after for dynamic sizes, as the original does.
    num_threads: threads decoding and augmenting (per process; with workers, per worker);
      default: the CPUs this process may use, at most 16 (with workers: 1).
    worker_count: Grain worker processes building whole batches (0: threads of this process).
    prefetch_buffer_size: examples read ahead (threads) or batches (per worker, with workers);
      default max(num_threads, 2 * local batch) examples, or 2 batches per worker.
    with_indices: add ``example_index`` (int64 (B,)) to every batch.
    """

    def __init__(
        self,
        data: Sequence[Pair] | ExampleSource,
        *,
        global_batch_size: int,
        sizes: TrainingSizes,
        seed: int,
        process_index: int | None = None,
        process_count: int | None = None,
        augment: Augment | None = DEFAULT_AUGMENT,
        resize_before_augment: bool | None = None,
        num_threads: int | None = None,
        worker_count: int = 0,
        prefetch_buffer_size: int | None = None,
        with_indices: bool = False,
    ):
        source = data if isinstance(data, ExampleSource) else FolderSource(list(data))
        if not isinstance(sizes, TrainingSizes):
            raise TypeError(f"sizes must be a TrainingSizes (TrainingSizes.fixed(), .dynamic()), got {sizes!r}")
        seed = _index(seed, "seed")
        global_batch_size = _index(global_batch_size, "global_batch_size", 1)
        if process_index is None or process_count is None:
            import jax

            process_index = jax.process_index() if process_index is None else process_index
            process_count = jax.process_count() if process_count is None else process_count
        process_count = _index(process_count, "process_count", 1)
        process_index = _index(process_index, "process_index")
        if process_index >= process_count:
            raise ValueError(f"process_index {process_index} is not below process_count {process_count}")
        if global_batch_size % process_count:
            raise ValueError(
                f"global_batch_size {global_batch_size} is not divisible by the {process_count} processes"
            )
        num_examples = len(source)
        if num_examples < global_batch_size:
            raise ValueError(
                f"{num_examples} examples are fewer than one global batch of {global_batch_size}; "
                "incomplete batches are dropped, so there would be nothing to train on"
            )
        if augment is DEFAULT_AUGMENT:
            augment = default_augment
        if augment is not None and not callable(augment):
            raise TypeError(f"augment must be callable or None, got {augment!r}")
        self.worker_count = _index(worker_count, "worker_count")
        default_threads = 1 if self.worker_count else min(16, _available_cpus())
        self.num_threads = default_threads if num_threads is None else _index(num_threads, "num_threads", 1)
        local = global_batch_size // process_count
        default_prefetch = 2 if self.worker_count else max(self.num_threads, 2 * local)
        if prefetch_buffer_size is None:
            self.prefetch_buffer_size = default_prefetch
        else:
            self.prefetch_buffer_size = _index(prefetch_buffer_size, "prefetch_buffer_size", 1)
        self.sizes = sizes
        self.seed = seed
        self.process_index = process_index
        self.process_count = process_count
        self.global_batch_size = global_batch_size
        self.local_batch_size = local
        self.num_examples = num_examples
        self.steps_per_epoch = steps_per_epoch(num_examples, global_batch_size)
        self.resize_before_augment = sizes.is_fixed if resize_before_augment is None else bool(resize_before_augment)
        self._examples = _Examples(
            source,
            global_batch_size=global_batch_size,
            local_batch_size=local,
            process_index=process_index,
            seed=seed,
            sizes=sizes,
            augment=augment,
            resize_first=self.resize_before_augment,
            with_indices=with_indices,
        )

    @property
    def source(self) -> ExampleSource:
        return self._examples.source

    def size_for_step(self, step: int) -> tuple[int, int]:
        """(height, width) of the batch of step `step`."""
        return self.sizes.size_for_step(self.seed, step)

    def epoch_of_step(self, step: int) -> int:
        return _index(step, "step") // self.steps_per_epoch

    def global_example_indices(self, step: int) -> np.ndarray:
        """Indices into the data of the whole global batch of step `step` (all processes, in order)."""
        step = _index(step, "step")
        start = step * self.global_batch_size
        return np.array([self._examples.index_at(start + i) for i in range(self.global_batch_size)], np.int64)

    def example_indices(self, step: int) -> np.ndarray:
        """Indices into the data of this process's examples of step `step`."""
        step = _index(step, "step")
        e = self._examples
        return np.array([e.index_at(e.position(step, k)) for k in range(self.local_batch_size)], np.int64)

    def load_batch(self, step: int) -> dict[str, np.ndarray]:
        """This process's batch of step `step`, built in the calling thread (for inspection and
        tests; training iterates with `iterator`)."""
        return self._examples.batch(_index(step, "step"))

    def dataset(self, start_step: int = 0):
        """The Grain ``IterDataset`` of this process's batches from `start_step` on."""
        grain = _import_grain()
        start_step = _index(start_step, "start_step")
        local = self.local_batch_size
        end_step = _FOREVER // local
        if start_step >= end_step:
            raise ValueError(f"start_step {start_step} is beyond the end of the stream ({end_step} steps)")
        if self.worker_count == 0:
            ds = grain.MapDataset.range(start_step * local, end_step * local).map(self._examples.element)
            it = ds.to_iter_dataset(
                grain.ReadOptions(num_threads=self.num_threads, prefetch_buffer_size=self.prefetch_buffer_size)
            )
            it = it.batch(local, drop_remainder=True, batch_fn=stack_examples)
            # Stacking in a thread of its own: the consumer only takes finished batches.
            prefetch = getattr(grain.experimental, "ThreadPrefetchIterDataset", None)
            return it if prefetch is None else prefetch(it, prefetch_buffer_size=2)
        _absl_flags_usable()
        ds = grain.MapDataset.range(start_step, end_step).map(self._examples.batch)
        it = ds.to_iter_dataset(grain.ReadOptions(num_threads=self.num_threads, prefetch_buffer_size=1))
        options = grain.MultiprocessingOptions(
            num_workers=self.worker_count, per_worker_buffer_size=self.prefetch_buffer_size
        )
        return it.mp_prefetch(options, worker_init_fn=_worker_init)

    def iterator(self, start_step: int = 0) -> TrainIterator:
        """Batches from step `start_step` on, exactly as an uninterrupted run would have them."""
        return TrainIterator(iter(self.dataset(start_step)), _index(start_step, "start_step"))

    def __iter__(self) -> TrainIterator:
        return self.iterator(0)


def make_train_iterator(
    data: Sequence[Pair] | ExampleSource,
    *,
    global_batch_size: int,
    sizes: TrainingSizes,
    seed: int,
    start_step: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
    augment: Augment | None = DEFAULT_AUGMENT,
    num_threads: int | None = None,
    worker_count: int = 0,
    **options,
) -> TrainIterator:
    """`TrainPipeline` (same arguments; `options`: resize_before_augment, prefetch_buffer_size,
    with_indices) iterated from `start_step`."""
    pipeline = TrainPipeline(
        data,
        global_batch_size=global_batch_size,
        sizes=sizes,
        seed=seed,
        process_index=process_index,
        process_count=process_count,
        augment=augment,
        num_threads=num_threads,
        worker_count=worker_count,
        **options,
    )
    return pipeline.iterator(start_step)
