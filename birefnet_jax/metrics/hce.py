"""Human correction effort (HCE, Qin et al., ECCV 2022): how many clicks a person would need to fix a
prediction: control points of polygons around the wrong regions, plus one per wrong region that
needs no polygon.

Steps: binarise both maps at > 128; drop false positives / negatives thinner than ``relax`` pixels
(they are fixed with the neighbouring boundary), except where the false negative cuts the ground
truth's skeleton (a structure a person must redraw); trace the contours of what is left, keep the
contour pixels that border the part a person would have to redraw against, approximate each kept run
with Ramer-Douglas-Peucker (``epsilon`` pixels) and count the vertices; regions with no kept contour
pixel cost one each.

OpenCV does the morphology, contours and polygon approximation, scikit-image the skeleton; the
original's per-point Python loop is replaced with array operations that give the same runs.
"""

from __future__ import annotations

import cv2
import numpy as np
from skimage.morphology import skeletonize

from .crop import crop_around

RELAX = 5
EPSILON = 2.0
_CROSS = cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))


_ALONE = 64 * 64  # components with a bounding box this large are thinned on their own


def gt_skeleton(fg: np.ndarray, touching: np.ndarray | None = None) -> np.ndarray:
    """Skeleton of the ground truth: scikit-image's (Zhang-Suen thinning), as the original uses.

    Thinning decides from 8-neighbourhoods, which never span two 8-connected components, so each
    component is thinned on its own bounding box (large ones alone, small ones together): the same
    skeleton, without scanning the whole image on every pass until the thickest part is thin.

    Args:
      touching: if given, only components that intersect this mask are thinned (HCE only uses the
        skeleton where the prediction misses the ground truth).
    """
    out = np.zeros(fg.shape, bool)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(np.ascontiguousarray(fg).view(np.uint8), connectivity=8)
    wanted = np.zeros(n, bool)
    if touching is None:
        wanted[1:] = True
    else:
        wanted[np.unique(labels[touching])] = True
        wanted[0] = False
    alone = wanted & (stats[:, cv2.CC_STAT_WIDTH] * stats[:, cv2.CC_STAT_HEIGHT] >= _ALONE)
    for k in np.flatnonzero(alone):
        x, y, w, h = stats[k, :4]
        box = (slice(y, y + h), slice(x, x + w))
        out[box] |= skeletonize(labels[box] == k)
    rest = wanted & ~alone
    if rest.any():
        mask = rest[labels]
        box = crop_around(mask, 0)
        out[box] |= skeletonize(mask[box])
    return out


def _regrow(seed: np.ndarray, allowed: np.ndarray, steps: int) -> np.ndarray:
    grown = seed.astype(np.uint8)
    allowed = allowed.astype(np.uint8)
    for _ in range(steps):
        grown = cv2.dilate(grown, _CROSS) & allowed
    return grown.view(bool)


def _effort(mask: np.ndarray, against: np.ndarray, epsilon: float) -> int:
    """Polygon vertices along the contour pixels of ``mask`` next to ``against``, plus the regions of
    ``mask`` that have none."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_TREE, cv2.CHAIN_APPROX_NONE)
    n_labels, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
    # The original numbers regions by the labels present and takes the first for the background, so a
    # mask without any background pixel has no free region.
    n_regions = 0 if mask.all() else n_labels - 1
    if not contours:
        return n_regions
    near = cv2.dilate(against.astype(np.uint8), _CROSS).view(bool)
    lengths = np.array([len(c) for c in contours])
    points = np.concatenate(contours).reshape(-1, 2)  # (x, y), contour after contour
    flat = points[:, 1].astype(np.int64) * mask.shape[1] + points[:, 0]
    # A contour pixel is used the first time it is met, and only if it borders ``against``.
    _, first = np.unique(flat, return_index=True)
    used = np.zeros(len(flat), bool)
    used[first] = True
    used &= near.ravel()[flat]

    touched = np.count_nonzero(np.unique(labels.ravel()[flat[used]]))
    free_regions = max(n_regions - touched, 0)

    contour_of = np.repeat(np.arange(len(contours)), lengths)
    # Runs: maximal stretches of used points along one contour.
    new_run = used.copy()
    new_run[1:] &= ~used[:-1] | (contour_of[1:] != contour_of[:-1])
    run_starts = np.flatnonzero(new_run)
    if run_starts.size == 0:
        return int(free_regions)
    run_ends = run_starts + np.bincount((np.cumsum(new_run) - 1)[used], minlength=run_starts.size)

    # When a contour's last run ends next to where its first run starts, they are one run cut by the
    # contour's starting point: the first is appended, reversed, to the last.
    run_contour = contour_of[run_starts]
    is_first = np.diff(run_contour, prepend=-1) != 0
    is_last = np.diff(run_contour, append=-1) != 0
    firsts, lasts = np.flatnonzero(is_first), np.flatnonzero(is_last)
    several = firsts != lasts
    firsts, lasts = firsts[several], lasts[several]
    gap = np.abs(points[run_starts[firsts]].astype(np.int64) - points[run_ends[lasts] - 1])
    joined = gap.max(axis=1) == 1  # 8-neighbours
    heads, tails = firsts[joined], lasts[joined]
    sizes = run_ends - run_starts
    sizes[tails] += sizes[heads]
    keep = np.ones(run_starts.size, bool)
    keep[heads] = False
    # Ramer-Douglas-Peucker keeps both ends, so runs of one or two points cost their length.
    vertices = int(sizes[keep & (sizes <= 2)].sum())
    head_of = dict(zip(tails.tolist(), heads.tolist(), strict=True))
    for k in np.flatnonzero(keep & (sizes > 2)):
        run = points[run_starts[k] : run_ends[k]]
        if k in head_of:
            head = head_of[k]
            run = np.concatenate([run, points[run_starts[head] : run_ends[head]][::-1]])
        vertices += len(cv2.approxPolyDP(run.reshape(-1, 1, 2).astype(np.int32), epsilon, False))
    return int(vertices + free_regions)


def human_correction_effort(
    pred: np.ndarray,
    fg: np.ndarray,
    skeleton: np.ndarray | None = None,
    relax: int = RELAX,
    epsilon: float = EPSILON,
) -> int:
    """HCE of ``pred`` (uint8, thresholded at > 128) against ``fg`` (bool).

    Args:
      skeleton: the ground truth's skeleton (bool, full size); computed with ``gt_skeleton`` if None.
    """
    p = pred > 128
    union = p | fg
    # Everything happens within a few pixels of the union of both masks.
    box = crop_around(union, relax + 3)
    if box is None:
        return 0
    p, g = p[box], fg[box]
    tp = p & g
    fp = p & ~g
    fn = g & ~p
    ske = gt_skeleton(g, touching=fn) if skeleton is None else skeleton[box]
    core = cv2.erode(union[box].astype(np.uint8), _CROSS, iterations=relax).view(bool)
    fp_kept = fp & _regrow(fp & core, ~g, relax)
    fn_kept = fn & _regrow(fn & core, ~p, relax)
    fn_kept |= ske & ~tp
    return _effort(fp_kept, tp | fn_kept, epsilon) + _effort(fn_kept, ~(tp | fp_kept | fn_kept), epsilon)
