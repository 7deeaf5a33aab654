"""Training resolutions: one fixed size, or the original's dynamic sizes on a fixed set of buckets.

The original trains at ``size`` (1024x1024 by default) or, with ``dynamic_size``, draws a new
resolution for every batch: width and height each uniform in [256, 2304], floored to a multiple
of 32. That makes 65 x 65 = 4225 possible shapes, and under XLA every new shape is a new
compilation. Here the draw lands on a small grid instead (`TrainingSizes.dynamic`: by default five
values per side, 256, 768, 1280, 1792, 2304, i.e. 25 shapes), each grid value weighted by how often
the original's draw, rounded to the nearest grid value, would land on it (the ends of the range
get half the weight of inner values; mean resolution as in the original). ``weighting="uniform"``
draws every bucket equally often instead.

Sizes are (height, width) here; the original's config writes (width, height).

`TrainingSizes.size_for_step(seed, step)` is a pure function of its arguments (hashed with NumPy's
`SeedSequence`, whose output does not change between NumPy versions), so every process of a
multi-host run, and a resumed run, picks the same size for the same step.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

MULTIPLE = 32  # the backbones downsample by 32: every side must be a multiple of it
DEFAULT_SIZE = (1024, 1024)  # the original's `size` (height, width)
ORIGINAL_DYNAMIC_RANGE = (256, 2304)  # the original's `dynamic_size`, each side, bounds included
DEFAULT_PER_SIDE = 5

_SIZE_STREAM = 2  # separates this stream from the pipeline's (permutations 0, augmentation 1)


def _side(value, what: str) -> int:
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError(f"{what} must be an integer, got {value!r}") from None
    if v <= 0 or v % MULTIPLE:
        raise ValueError(f"{what} must be a positive multiple of {MULTIPLE}, got {v}")
    return v


def _check_seed_step(seed, step) -> tuple[int, int]:
    out = []
    for name, value in (("seed", seed), ("step", step)):
        try:
            v = operator.index(value)
        except TypeError:
            raise TypeError(f"{name} must be an integer, got {value!r}") from None
        if v < 0:
            raise ValueError(f"{name} must be >= 0, got {v}")
        out.append(v)
    return out[0], out[1]


def unit_draw(seed: int, stream: int, index: int) -> float:
    """A number uniform in [0, 1) that depends only on (seed, stream, index)."""
    word = np.random.SeedSequence([seed, stream, index]).generate_state(1, np.uint64)[0]
    return int(word >> np.uint64(11)) / float(1 << 53)


def grid_values(low: int, high: int, count: int) -> tuple[int, ...]:
    """`count` values evenly spread over [low, high] (both included), rounded to multiples of 32;
    fewer if the range is too narrow to hold `count` distinct ones. One value: the middle."""
    low, high = _side(low, "low"), _side(high, "high")
    if low > high:
        raise ValueError(f"empty size range [{low}, {high}]")
    if count < 1:
        raise ValueError(f"need at least one value per side, got {count}")
    points = [(low + high) / 2] if count == 1 else np.linspace(low, high, count)
    return tuple(sorted({int(round(p / MULTIPLE)) * MULTIPLE for p in points}))


def original_weights(low: int, high: int, values: Sequence[int]) -> tuple[float, ...]:
    """How often the original's draw for one side (an integer uniform in [low, high], floored to a
    multiple of 32) lands nearest to each of `values`; a draw halfway between two values counts
    half for each."""
    drawn = np.arange(low, high + 1) // MULTIPLE * MULTIPLE
    v = np.asarray(values, np.int64)
    dist = np.abs(drawn[:, None] - v[None, :])
    nearest = (dist == dist.min(axis=1, keepdims=True)).astype(np.float64)
    mass = (nearest / nearest.sum(axis=1, keepdims=True)).sum(axis=0)
    return tuple(float(m) for m in mass / mass.sum())


@dataclass(frozen=True, init=False)
class TrainingSizes:
    """The (height, width) sizes training may use, and how often each is drawn.

    Build with `fixed`, `dynamic` or `grid`, or directly from sizes (and optional weights; default
    all equal). Every side is a positive multiple of 32.
    """

    sizes: tuple[tuple[int, int], ...]
    weights: tuple[float, ...]

    def __init__(self, sizes: Sequence[Sequence[int]], weights: Sequence[float] | None = None):
        checked = []
        for s in sizes:
            if len(s) != 2:
                raise ValueError(f"a size is (height, width), got {s!r}")
            checked.append((_side(s[0], "height"), _side(s[1], "width")))
        if not checked:
            raise ValueError("TrainingSizes needs at least one size")
        if len(set(checked)) != len(checked):
            raise ValueError(f"sizes listed twice in {checked}")
        w = np.ones(len(checked)) if weights is None else np.asarray(weights, np.float64)
        if w.shape != (len(checked),):
            raise ValueError(f"{len(checked)} sizes but {w.size} weights")
        if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
            raise ValueError(f"weights must be finite, >= 0 and not all 0, got {tuple(w)}")
        object.__setattr__(self, "sizes", tuple(checked))
        object.__setattr__(self, "weights", tuple(float(x) for x in w / w.sum()))
        object.__setattr__(self, "_cdf", np.cumsum(self.weights))

    @classmethod
    def fixed(cls, size: int | Sequence[int] = DEFAULT_SIZE) -> TrainingSizes:
        """One size for every step (the original without ``dynamic_size``); an int means square."""
        h, w = (size, size) if isinstance(size, int) else size
        return cls([(h, w)])

    @classmethod
    def grid(
        cls,
        heights: Sequence[int],
        widths: Sequence[int],
        height_weights: Sequence[float] | None = None,
        width_weights: Sequence[float] | None = None,
    ) -> TrainingSizes:
        """Every (height, width) of two lists; a bucket's weight is the product of its sides'."""
        hw = np.ones(len(heights)) if height_weights is None else np.asarray(height_weights, np.float64)
        ww = np.ones(len(widths)) if width_weights is None else np.asarray(width_weights, np.float64)
        if hw.shape != (len(heights),) or ww.shape != (len(widths),):
            raise ValueError("one weight per height and one per width")
        sizes = [(h, w) for h in heights for w in widths]
        return cls(sizes, np.outer(hw, ww).ravel())

    @classmethod
    def dynamic(
        cls,
        height_range: Sequence[int] = ORIGINAL_DYNAMIC_RANGE,
        width_range: Sequence[int] | None = None,
        per_side: int | Sequence[int] = DEFAULT_PER_SIDE,
        *,
        weighting: str = "original",
    ) -> TrainingSizes:
        """The original's dynamic sizes on a grid: `per_side` values (or (n_heights, n_widths))
        evenly spread over each range (bounds included, multiples of 32; width range defaults to
        the height range). Height and width are drawn independently, as in the original.

        `weighting`: ``"original"`` weights each value by how the original's uniform draw would
        land on it when rounded to the nearest value (`original_weights`); ``"uniform"`` draws each
        bucket equally often. The default (256..2304, 5 per side) gives 25 buckets; ``per_side=9``
        gives the multiples of 256 (81 buckets, closer to the original, more compilations).
        """
        width_range = height_range if width_range is None else width_range
        nh, nw = (per_side, per_side) if isinstance(per_side, int) else per_side
        hs, ws = grid_values(*height_range, nh), grid_values(*width_range, nw)
        if weighting == "original":
            return cls.grid(hs, ws, original_weights(*height_range, hs), original_weights(*width_range, ws))
        if weighting == "uniform":
            return cls.grid(hs, ws)
        raise ValueError(f"weighting must be 'original' or 'uniform', got {weighting!r}")

    def __len__(self) -> int:
        return len(self.sizes)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(self.sizes)

    @property
    def is_fixed(self) -> bool:
        return len(self.sizes) == 1

    @property
    def max_size(self) -> tuple[int, int]:
        """The largest height and the largest width (for sizing buffers)."""
        return max(h for h, _ in self.sizes), max(w for _, w in self.sizes)

    def index_for_step(self, seed: int, step: int) -> int:
        """Which bucket step `step` of a run seeded with `seed` uses."""
        seed, step = _check_seed_step(seed, step)
        if len(self.sizes) == 1:
            return 0
        u = unit_draw(seed, _SIZE_STREAM, step) * self._cdf[-1]
        return min(int(np.searchsorted(self._cdf, u, side="right")), len(self.sizes) - 1)

    def size_for_step(self, seed: int, step: int) -> tuple[int, int]:
        """(height, width) of the batch of step `step`: deterministic in (seed, step), drawn with
        the buckets' weights, the same in every process."""
        return self.sizes[self.index_for_step(seed, step)]
