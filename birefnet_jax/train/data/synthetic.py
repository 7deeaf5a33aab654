"""A synthetic dichotomous-segmentation data set: thin-structured objects on textured backgrounds.

Each example is rendered geometry first.  The object (wheels with spokes, fences and lattices, trusses,
hanging wires, tufts of hair-like strands, bodies with thin legs) is a union of capsules (line segments
with a radius), discs and ellipses, rasterised with NumPy on a grid ``SUPERSAMPLE`` times finer than the
image and averaged down, so the mask's edges are soft (``SUPERSAMPLE ** 2 + 1`` coverage levels) like real
DIS ground truth.  Then a foreground colour with its own shading is composited over a textured background
(gradients, value noise, stripes, checkerboards, grain) with that mask as alpha: ``image = fg * a + bg * (1 - a)``,
``a = mask / 255``, rounded, so the mask is exactly the object.  The foreground colour is kept well away from
the background's mean colour, so the task is learnable.

Every example is a function of ``(seed, index, size)`` alone (NumPy's ``default_rng([seed, index])``);
sizes are (height, width), as elsewhere in this package.  Object sizes scale with the image, line widths
do not: the thin parts are 1.2-3 pixels wide at any size.  An object is redrawn (at most `MAX_ATTEMPTS`
times, then the closest is kept) until its soft foreground fraction is in [`MIN_FOREGROUND`,
`MAX_FOREGROUND`] and its mask has runs of 1-3 pixels along rows or columns; from about 64 pixels a side
that always succeeds in practice, on tiny images it is best effort.

`write_synthetic_dataset` writes the original's layout, ``<root>/<task>/<set_name>/im/<stem>.jpg`` and
``.../gt/<stem>.png``, each file atomically.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

SUPERSAMPLE = 4  # the mask is rendered on a grid this many times finer per axis, then averaged
MIN_FOREGROUND = 0.03  # soft foreground fraction (mean of mask / 255) aimed for
MAX_FOREGROUND = 0.55
MAX_ATTEMPTS = 8  # objects redrawn at most this often to land in the range
MAX_COMPONENTS = 5
MIN_CONTRAST = 110.0  # least RGB distance between the foreground colour and the background's mean
JPEG_QUALITY = 95
_PIECE = 3.0  # long segments are rasterised in pieces of at most this length (pixels)
_CHUNK_SAMPLES = 1 << 15  # samples evaluated at once when rasterising capsules (cache-sized)


class _Canvas:
    """A boolean mask on a supersampled grid; coordinates are (x, y) in output pixels, y down."""

    def __init__(self, height: int, width: int, supersample: int = SUPERSAMPLE):
        self.h, self.w, self.s = height, width, supersample
        self.data = np.zeros((height * supersample, width * supersample), bool)

    def fraction(self) -> float:
        return np.count_nonzero(self.data) / self.data.size

    def coverage(self) -> np.ndarray:
        """uint8 (H, W) mask: the share of covered sub-samples per pixel, scaled to 0..255 and rounded."""
        s = self.s
        if s in (2, 4, 8):  # fast path: each row's s sub-samples of a pixel are one s-byte integer
            words = self.data.view(f"<u{s}").reshape(self.h, s, self.w)
            column_sums = words.sum(axis=1, dtype=f"<u{s}")  # per byte <= s: no carries
            ones = int.from_bytes(b"\x01" * s, "little")
            counts = (column_sums * np.array(ones, f"<u{s}")) >> np.array(8 * (s - 1), f"<u{s}")
        else:
            counts = self.data.reshape(self.h, s, self.w, s).sum(axis=(1, 3), dtype=np.int32)
        return np.round(counts * (255.0 / (s * s))).astype(np.uint8)

    def _grid(self, x0: float, x1: float, y0: float, y1: float):
        """Sub-sample index ranges and centre coordinates covering the box [x0, x1] x [y0, y1]."""
        s = self.s
        ix0, ix1 = max(int(np.floor(x0 * s)), 0), min(int(np.ceil(x1 * s)) + 1, self.data.shape[1])
        iy0, iy1 = max(int(np.floor(y0 * s)), 0), min(int(np.ceil(y1 * s)) + 1, self.data.shape[0])
        if ix0 >= ix1 or iy0 >= iy1:
            return None
        xs = (np.arange(ix0, ix1, dtype=np.float32) + 0.5) / s
        ys = (np.arange(iy0, iy1, dtype=np.float32) + 0.5) / s
        return (slice(iy0, iy1), slice(ix0, ix1)), xs[None, :], ys[:, None]

    def capsules(self, p0, p1, radius) -> None:
        """Segments p0[i]-p1[i] ((n, 2) arrays of (x, y)) thickened by radius[i] (a scalar or (n,))."""
        p0 = np.asarray(p0, np.float64).reshape(-1, 2)
        p1 = np.asarray(p1, np.float64).reshape(-1, 2)
        radius = np.broadcast_to(np.asarray(radius, np.float64), (len(p0),))
        if not len(p0):
            return
        # Split long segments so each piece's window stays small.
        length = np.hypot(*(p1 - p0).T)
        pieces = np.maximum(1, np.ceil(length / _PIECE)).astype(np.int64)
        seg = np.repeat(np.arange(len(p0)), pieces)
        k = np.arange(len(seg)) - np.repeat(np.cumsum(pieces) - pieces, pieces)
        t0, t1 = (k / pieces[seg])[:, None], ((k + 1) / pieces[seg])[:, None]
        a = p0[seg] + (p1 - p0)[seg] * t0
        b = p0[seg] + (p1 - p0)[seg] * t1
        r = radius[seg]
        lo = np.minimum(a, b) - r[:, None]
        hi = np.maximum(a, b) + r[:, None]
        keep = (hi[:, 0] >= 0) & (hi[:, 1] >= 0) & (lo[:, 0] <= self.w) & (lo[:, 1] <= self.h)
        a, b, r, lo, hi = a[keep], b[keep], r[keep], lo[keep], hi[keep]
        if not len(a):
            return
        s = self.s
        rows, cols = self.data.shape
        start = np.floor(lo * s).astype(np.int64)
        span = int(np.max(np.ceil(hi * s).astype(np.int64) - start)) + 1
        span_y, span_x = min(span, rows), min(span, cols)
        # Shift every window inside the canvas (it still covers its piece's visible part).
        start[:, 0] = np.clip(start[:, 0], 0, cols - span_x)
        start[:, 1] = np.clip(start[:, 1], 0, rows - span_y)
        # Per piece: unit direction u, length, and coordinates relative to its first end point; then
        # along = (p - a) . u and across = (p - a) x u, both separable in x and y.
        d = b - a
        length = np.hypot(d[:, 0], d[:, 1])
        u = d / np.maximum(length, 1e-12)[:, None]
        chunk = max(1, _CHUNK_SAMPLES // (span_x * span_y))
        for c in range(0, len(a), chunk):
            sl = slice(c, c + chunk)
            ix = start[sl, 0, None] + np.arange(span_x)  # (m, span_x)
            iy = start[sl, 1, None] + np.arange(span_y)  # (m, span_y)
            px = (ix + 0.5) / s - a[sl, 0, None]
            py = (iy + 0.5) / s - a[sl, 1, None]
            ux, uy = u[sl, 0, None], u[sl, 1, None]
            along = (py * uy).astype(np.float32)[:, :, None] + (px * ux).astype(np.float32)[:, None, :]
            across = (py * ux).astype(np.float32)[:, :, None] - (px * uy).astype(np.float32)[:, None, :]
            over = along - np.clip(along, 0.0, length[sl, None, None].astype(np.float32))
            dist2 = np.square(over, out=over)
            dist2 += np.square(across, out=across)
            hit = dist2 <= (r[sl] ** 2).astype(np.float32)[:, None, None]
            m, yy, xx = np.nonzero(hit)
            self.data[iy[m, yy], ix[m, xx]] = True

    def polyline(self, points, radius) -> None:
        """A chain of capsules through ``points`` ((n, 2)); ``radius`` per segment (n - 1) or a scalar."""
        points = np.asarray(points, np.float64)
        self.capsules(points[:-1], points[1:], radius)

    def circle(self, centre, r_circle: float, radius: float) -> None:
        """A ring: the circle of radius ``r_circle`` thickened by ``radius``."""
        n = max(12, int(np.ceil(2 * np.pi * r_circle / 2.5)))
        theta = np.linspace(0, 2 * np.pi, n + 1)
        pts = np.stack([centre[0] + r_circle * np.cos(theta), centre[1] + r_circle * np.sin(theta)], axis=1)
        self.polyline(pts, radius)

    def ellipse(self, centre, a: float, b: float, angle: float = 0.0) -> None:
        """A filled ellipse with semi-axes a (along ``angle``, radians) and b."""
        ext = max(a, b)
        grid = self._grid(centre[0] - ext, centre[0] + ext, centre[1] - ext, centre[1] + ext)
        if grid is None:
            return
        region, xs, ys = grid
        c, s = np.cos(angle), np.sin(angle)
        u = (xs - centre[0]) * c + (ys - centre[1]) * s
        v = -(xs - centre[0]) * s + (ys - centre[1]) * c
        self.data[region] |= (u / a) ** 2 + (v / b) ** 2 <= 1.0


# Object components.  Each draws into the canvas; `scale` is min(height, width).


def _thin_radius(rng: np.random.Generator) -> float:
    """Half-width of a thin part: widths 1.2-3 pixels (narrower lines would fade below half coverage)."""
    return float(rng.uniform(0.6, 1.5))


def _rotate(points: np.ndarray, angle: float, centre) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    rot = np.array([[c, -s], [s, c]])
    return points @ rot.T + np.asarray(centre)


def _wheel(cv: _Canvas, rng: np.random.Generator, scale: float) -> None:
    """A rim (sometimes with a tyre), spokes from a hub, the hub."""
    centre = rng.uniform(0.2, 0.8, size=2) * (cv.w, cv.h)
    big = float(rng.uniform(0.15, 0.42) * scale)
    rim = float(rng.uniform(0.8, 3.0))
    cv.circle(centre, big, rim)
    if rng.random() < 0.5:
        cv.circle(centre, big + rim + float(rng.uniform(1.5, 4.0)), float(rng.uniform(1.0, 3.5)))
    hub = float(rng.uniform(0.04, 0.12) * big) + 1.5
    count = int(rng.integers(6, 37))
    start = rng.uniform(0, 2 * np.pi) + np.arange(count) * 2 * np.pi / count
    lacing = float(rng.uniform(-0.6, 0.6)) if rng.random() < 0.5 else 0.0
    inner = np.stack([np.cos(start), np.sin(start)], 1) * hub + centre
    outer = np.stack([np.cos(start + lacing), np.sin(start + lacing)], 1) * big + centre
    cv.capsules(inner, outer, float(rng.uniform(0.4, 1.0)))
    cv.ellipse(centre, hub, hub)


def _clip_line(p: np.ndarray, q: np.ndarray, half_w: float, half_h: float):
    """The part of segment p-q inside [-half_w, half_w] x [-half_h, half_h] (Liang-Barsky), or None."""
    d = q - p
    t0, t1 = 0.0, 1.0
    for pk, qk in ((-d[0], p[0] + half_w), (d[0], half_w - p[0]), (-d[1], p[1] + half_h), (d[1], half_h - p[1])):
        if pk == 0:
            if qk < 0:
                return None
            continue
        t = qk / pk
        if pk < 0:
            t0 = max(t0, t)
        else:
            t1 = min(t1, t)
    if t0 > t1:
        return None
    return p + t0 * d, p + t1 * d


def _lattice(cv: _Canvas, rng: np.random.Generator, scale: float) -> None:
    """A fence / grid / diamond mesh of thin bars inside a frame, possibly rotated."""
    centre = rng.uniform(0.3, 0.7, size=2) * (cv.w, cv.h)
    half_w, half_h = (float(v) for v in rng.uniform(0.15, 0.42, size=2) * scale)
    angle = float(rng.uniform(-0.7, 0.7)) if rng.random() < 0.6 else 0.0
    bar = _thin_radius(rng)
    spacing = float(rng.uniform(max(7.0, 6 * bar), max(9.0, 0.12 * scale)))
    diamond = rng.random() < 0.3
    starts, ends = [], []
    reach = half_w + half_h
    for offset in np.arange(-reach, reach + 1e-9, spacing) + float(rng.uniform(0, spacing)):
        if diamond:
            lines = [
                ((offset - reach, -reach), (offset + reach, reach)),  # x - y = offset
                ((offset - reach, reach), (offset + reach, -reach)),  # x + y = offset
            ]
        else:
            lines = [((offset, -reach), (offset, reach))]
            if rng.random() < 0.85:
                lines.append(((-reach, offset), (reach, offset)))
        for p, q in lines:
            clipped = _clip_line(np.asarray(p, float), np.asarray(q, float), half_w, half_h)
            if clipped is not None:
                starts.append(clipped[0])
                ends.append(clipped[1])
    if starts:
        cv.capsules(_rotate(np.array(starts), angle, centre), _rotate(np.array(ends), angle, centre), bar)
    corners = np.array([[-half_w, -half_h], [half_w, -half_h], [half_w, half_h], [-half_w, half_h], [-half_w, -half_h]])
    cv.polyline(_rotate(corners, angle, centre), float(rng.uniform(1.2, 4.0)))


def _truss(cv: _Canvas, rng: np.random.Generator, scale: float) -> None:
    """Two thick rails joined by thin zig-zag (or crossed) braces, like a crane jib or a bridge."""
    centre = rng.uniform(0.3, 0.7, size=2) * (cv.w, cv.h)
    length = float(rng.uniform(0.5, 0.95) * scale)
    rail = float(rng.uniform(1.2, 3.5))
    depth = max(float(rng.uniform(0.06, 0.2) * scale), 2 * rail + 8.0)  # the rails stay apart
    angle = float(rng.uniform(0, np.pi))
    panels = int(rng.integers(4, 13))
    xs = np.linspace(-length / 2, length / 2, panels + 1)
    top = np.stack([xs, np.full_like(xs, -depth / 2)], 1)
    bottom = np.stack([xs, np.full_like(xs, depth / 2)], 1)
    cv.polyline(_rotate(top, angle, centre), rail)
    cv.polyline(_rotate(bottom, angle, centre), rail)
    brace = _thin_radius(rng)
    crossed = rng.random() < 0.4
    if crossed:  # both diagonals of every panel
        p, q = [top[:-1], bottom[:-1]], [bottom[1:], top[1:]]
    else:  # alternating diagonals (a Warren truss)
        even = (np.arange(panels) % 2 == 0)[:, None]
        p, q = [np.where(even, top[:-1], bottom[:-1])], [np.where(even, bottom[1:], top[1:])]
    for a, b in zip(p, q, strict=True):
        cv.capsules(_rotate(a, angle, centre), _rotate(b, angle, centre), brace)
    cv.capsules(_rotate(top, angle, centre), _rotate(bottom, angle, centre), brace)  # verticals


def _wires(cv: _Canvas, rng: np.random.Generator, scale: float) -> None:
    """Sagging cables across the image, sometimes from a pole with a cross-arm."""
    w, h = cv.w, cv.h
    count = int(rng.integers(1, 5))
    pole = rng.random() < 0.5
    if pole:
        x = float(rng.uniform(0.25, 0.75) * w)
        top = float(rng.uniform(0.05, 0.35) * h)
        arm = float(rng.uniform(0.1, 0.25) * scale)
        cv.capsules([[x, top], [x - arm, top + 4]], [[x, h + 5], [x + arm, top + 4]], float(rng.uniform(2.0, 5.0)))
    t = np.linspace(0, 1, 48)[:, None]
    for i in range(count):
        if pole:
            anchor = np.array([x - arm + 2 * arm * (i + 0.5) / count, top + 4])
            far = np.array([0.0 if rng.random() < 0.5 else float(w), float(rng.uniform(0.1, 0.7) * h)])
            p0, p2 = (anchor, far) if rng.random() < 0.5 else (far, anchor)
        else:
            p0 = np.array([0.0, float(rng.uniform(0.05, 0.8) * h)])
            p2 = np.array([float(w), float(rng.uniform(0.05, 0.8) * h)])
        sag = float(rng.uniform(0.02, 0.3) * scale)
        p1 = (p0 + p2) / 2 + [float(rng.uniform(-0.1, 0.1) * w), sag]
        curve = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2
        cv.polyline(curve, float(rng.uniform(0.5, 2.2)))


def _strands(cv: _Canvas, rng: np.random.Generator, scale: float) -> None:
    """A tuft of curved, tapering hair-like strands from a common root."""
    root = rng.uniform(0.25, 0.75, size=2) * (cv.w, cv.h)
    direction = float(rng.uniform(0, 2 * np.pi))
    spread = float(rng.uniform(0.2, 1.4))
    reach = float(rng.uniform(0.25, 0.55) * scale)
    count = int(rng.integers(8, 36))
    jitter = 0.03 * scale
    for _ in range(count):
        length = reach * float(rng.uniform(0.5, 1.2))
        steps = max(6, int(length / 5))
        step = length / steps
        bend = float(rng.normal(0, 1.2 / length))
        heading = direction + float(rng.normal(0, spread))
        headings = heading + np.cumsum(bend * step + rng.normal(0, 0.06, size=steps))
        deltas = np.stack([np.cos(headings), np.sin(headings)], 1) * step
        start = root + rng.normal(0, jitter, size=2)
        points = np.vstack([start, start + np.cumsum(deltas, axis=0)])
        r0 = float(rng.uniform(0.5, 1.5))
        cv.polyline(points, np.linspace(r0, max(0.35, 0.45 * r0), steps))


def _body(cv: _Canvas, rng: np.random.Generator, scale: float) -> None:
    """A filled ellipse with thin jointed legs (insect-like)."""
    centre = rng.uniform(0.3, 0.7, size=2) * (cv.w, cv.h)
    a, b = float(rng.uniform(0.06, 0.2) * scale), float(rng.uniform(0.03, 0.1) * scale)
    angle = float(rng.uniform(0, np.pi))
    cv.ellipse(centre, a, b, angle)
    legs = int(rng.integers(2, 5))
    leg_r = _thin_radius(rng)
    for side in (-1, 1):
        for i in range(legs):
            along = (i + 0.5) / legs * 1.4 - 0.7
            base = np.array([along * a, side * b * 0.8])
            knee = base + [float(rng.uniform(-0.3, 0.3) * a), side * float(rng.uniform(0.5, 1.2) * b + 0.1 * scale)]
            foot = knee + [float(rng.uniform(-0.4, 0.4) * a), side * float(rng.uniform(0.05, 0.2) * scale)]
            cv.polyline(_rotate(np.array([base, knee, foot]), angle, centre), leg_r)


_THIN: tuple[Callable, ...] = (_wheel, _lattice, _truss, _wires, _strands)
_ALL: tuple[Callable, ...] = _THIN + (_body,)


def _thin_runs(mask: np.ndarray) -> int:
    """How many runs of 1-3 pixels the mask (thresholded at half) has along its rows and columns."""
    binary = mask >= 128
    total = 0
    for rows in (binary, binary.T):
        steps = np.diff(np.pad(rows.astype(np.int8), ((0, 0), (1, 1))), axis=1).ravel()
        lengths = np.flatnonzero(steps == -1) - np.flatnonzero(steps == 1)
        total += int(np.count_nonzero(lengths <= 3))
    return total


def _object_mask(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A mask whose soft foreground fraction is in range and which has thin parts (best effort if tiny)."""
    scale = float(min(height, width))
    min_thin = max(8, int(scale) // 4)
    best, best_score = None, None
    for _ in range(MAX_ATTEMPTS):
        cv = _Canvas(height, width)
        target = float(rng.uniform(MIN_FOREGROUND, 0.25))
        _THIN[int(rng.integers(len(_THIN)))](cv, rng, scale)  # always at least one thin-structured part
        for _ in range(MAX_COMPONENTS - 1):
            if cv.fraction() >= target:
                break
            _ALL[int(rng.integers(len(_ALL)))](cv, rng, scale)
        mask = cv.coverage()
        fraction, thin = mask.mean() / 255.0, _thin_runs(mask)
        if MIN_FOREGROUND <= fraction <= MAX_FOREGROUND and thin >= min_thin:
            return mask
        score = (abs(fraction - 0.15), -thin)
        if best is None or score < best_score:
            best, best_score = mask, score
    return best


# Appearance.


def _value_noise(rng: np.random.Generator, height: int, width: int, cells: int) -> np.ndarray:
    """Smooth noise in [0, 1]: a coarse random grid upsampled bicubically."""
    coarse = rng.random((cells + 1, cells + 1)).astype(np.float32)
    img = Image.fromarray(coarse, "F").resize((width, height), Image.Resampling.BICUBIC)
    return np.clip(np.asarray(img, np.float32), 0.0, 1.0)


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    return (rng.random(3) * 255).astype(np.float32)


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """float32 (H, W, 3) in 0..255: a gradient, value noise, stripes or a checkerboard, plus grain."""
    yy = (np.arange(height, dtype=np.float32) / max(height - 1, 1))[:, None]
    xx = (np.arange(width, dtype=np.float32) / max(width - 1, 1))[None, :]
    c0, c1 = _random_colour(rng), _random_colour(rng)
    kind = int(rng.integers(4))
    if kind == 0:  # linear or radial gradient
        if rng.random() < 0.5:
            theta = float(rng.uniform(0, 2 * np.pi))
            t = xx * np.float32(np.cos(theta)) + yy * np.float32(np.sin(theta))
        else:
            cx, cy = (np.float32(v) for v in rng.uniform(0, 1, size=2))
            t = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2)
    elif kind == 1:  # multi-octave value noise
        t = sum(_value_noise(rng, height, width, 2**o) * np.float32(0.5**o) for o in range(1, 5))
    elif kind == 2:  # stripes, sinusoidal or hard
        theta = float(rng.uniform(0, np.pi))
        freq = np.float32(2 * np.pi / rng.uniform(0.03, 0.25))
        t = 0.5 + 0.5 * np.sin(freq * (xx * np.float32(np.cos(theta)) + yy * np.float32(np.sin(theta))))
        if rng.random() < 0.5:
            t = (t > 0.5).astype(np.float32)
    else:  # checkerboard
        cells = np.float32(rng.uniform(4, 16))
        t = ((np.floor(xx * cells) + np.floor(yy * cells)) % 2).astype(np.float32)
    lo, hi = float(t.min()), float(t.max())
    t = (t - np.float32(lo)) / np.float32(max(hi - lo, 1e-6))
    bg = c0 + (c1 - c0) * t[..., None]
    bg *= (0.75 + 0.5 * _value_noise(rng, height, width, int(rng.integers(3, 9))))[..., None]
    bg += rng.standard_normal(bg.shape, dtype=np.float32) * np.float32(rng.uniform(0, 8))
    return np.clip(bg, 0, 255, out=bg)


def _foreground(rng: np.random.Generator, height: int, width: int, avoid: np.ndarray) -> np.ndarray:
    """float32 (H, W, 3): a colour at least MIN_CONTRAST from ``avoid``, shaded and grained a little."""
    colour = None
    for _ in range(32):
        candidate = _random_colour(rng)
        if np.linalg.norm(candidate - avoid) >= MIN_CONTRAST:
            colour = candidate
            break
    if colour is None:  # the extreme (black or white) further from the background
        colour = np.full(3, 0.0 if avoid.mean() > 127.5 else 255.0, np.float32)
    shade = 1.0 + float(rng.uniform(0.05, 0.25)) * (2 * _value_noise(rng, height, width, 4) - 1)
    fg = colour * shade[..., None]
    fg += rng.standard_normal(fg.shape, dtype=np.float32) * np.float32(3.0)
    return np.clip(fg, 0, 255, out=fg)


def _check_size(size) -> tuple[int, int]:
    try:
        height, width = (int(v) for v in size)
    except (TypeError, ValueError):
        raise TypeError(f"size must be (height, width), got {size!r}") from None
    if height < 1 or width < 1:
        raise ValueError(f"size must be positive (height, width), got {size!r}")
    return height, width


def _check_seed(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return int(value)


def synthetic_example(seed: int, index: int, size: tuple[int, int] = (256, 256)) -> tuple[np.ndarray, np.ndarray]:
    """Example ``index`` of the set ``seed``: image uint8 (H, W, 3) RGB and its exact mask uint8 (H, W).

    ``size`` is (height, width).  The same arguments always give the same pair.
    """
    seed, index = _check_seed("seed", seed), _check_seed("index", index)
    height, width = _check_size(size)
    rng = np.random.default_rng([seed, index])
    background = _background(rng, height, width)
    mask = _object_mask(rng, height, width)
    foreground = _foreground(rng, height, width, background.mean(axis=(0, 1)))
    alpha = (mask.astype(np.float32) / 255.0)[..., None]
    image = foreground * alpha + background * (1.0 - alpha)
    return np.clip(np.round(image), 0, 255).astype(np.uint8), mask


def _save_atomic(img: Image.Image, path: Path, **kwargs) -> None:
    """Save to a temporary file beside ``path`` (a name no loader picks up), then rename it into place."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the usual permissions, after umask
    try:
        with os.fdopen(fd, "wb") as f:
            img.save(f, **kwargs)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_synthetic_dataset(
    root,
    count: int,
    size: tuple[int, int] = (256, 256),
    seed: int = 0,
    task: str = "DIS5K",
    set_name: str = "SYN-TR",
) -> Path:
    """Write ``count`` examples as ``<root>/<task>/<set_name>/{im/<stem>.jpg, gt/<stem>.png}``.

    Stems are ``syn_00000``, ``syn_00001``, ... (example ``i`` is ``synthetic_example(seed, i, size)``);
    images are JPEG (quality `JPEG_QUALITY`, no chroma subsampling), masks 8-bit grey PNG.  Each file is
    written to a temporary name and renamed, so an interrupted run leaves no partial file.  Existing files
    of the same names are replaced; others are left alone.  Returns the set folder.
    """
    count = _check_seed("count", count)
    for name, value in (("task", task), ("set_name", set_name)):
        if not isinstance(value, str) or not value or value in (".", "..") or "/" in value or os.sep in value:
            raise ValueError(f"{name} must be a plain folder name, got {value!r}")
    _check_size(size)
    folder = Path(root) / task / set_name
    (folder / "im").mkdir(parents=True, exist_ok=True)
    (folder / "gt").mkdir(parents=True, exist_ok=True)
    for i in range(count):
        image, mask = synthetic_example(seed, i, size)
        stem = f"syn_{i:05d}"
        _save_atomic(Image.fromarray(image, "RGB"), folder / "im" / f"{stem}.jpg",
                     format="JPEG", quality=JPEG_QUALITY, subsampling=0)
        _save_atomic(Image.fromarray(mask, "L"), folder / "gt" / f"{stem}.png", format="PNG")
    return folder
