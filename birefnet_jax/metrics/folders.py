"""Evaluating folders of predictions against folders of ground truths, as the original's evaluator:
what `birefnet-jax eval` (and `python eval.py`) runs.

Two layouts:

* one folder of predictions against one folder of ground truths, paired by file name stem;
* the original's: ``{pred_root}/{method}/{dataset}/*.png`` against ``{data_root}/{dataset}/gt/*``, for
  several data sets and methods; with a `predict` callable the predictions of one method are made
  first, from ``{data_root}/{dataset}/im``.

Results: a table per data set (columns in the original's order for `task`) in
``{save_dir}/{dataset}_eval.txt``, everything at full precision in ``{save_dir}/results.json`` and
``results.csv``, precision-recall / F-measure curves in ``{save_dir}/{dataset}_pr.png`` / ``_fm.png``,
and with `per_image` every image's metrics in ``{save_dir}/{dataset}--{method}_per_image.csv``. If a
folder named ``ske`` sits next to a ground-truth folder, HCE takes the skeletons from it (by stem) as
the original does; otherwise they are computed.

Every mistake that can be seen before the work (a missing data set, method or folder, an unwritable
`save_dir`) raises `UsageError` (a ValueError) naming all of them, before anything is predicted or
written; predictions and ground truths that do not pair raise `PairingError`.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
from tqdm import tqdm

from birefnet_jax.metrics import report
from birefnet_jax.metrics.evaluator import ALL_METRICS, Evaluator, evaluate_pair, skeleton_of
from birefnet_jax.metrics.io import list_images, pair_by_stem, read_gray


class UsageError(ValueError):
    """A mistake in the request found before any work: a missing data set, an unwritable save_dir."""


Names = str | Sequence[str] | None  # '+'- or ','-separated names, or a sequence of names
Results = dict[tuple[str, str], dict]  # (dataset, method) -> Evaluator.results()


def split_names(text: Names) -> list[str]:
    """'a+b,c' -> ['a', 'b', 'c'] (empty parts dropped); a sequence of names is returned as a list."""
    if text is None or isinstance(text, str):
        return [t for t in (text or "").replace(",", "+").split("+") if t]
    return [str(t) for t in text if t]


def parse_metrics(metrics: Names) -> list[str]:
    """'all' (or None) or '+'-separated names from `ALL_METRICS` -> the list; ValueError otherwise."""
    if metrics is None or metrics == "all":
        return list(ALL_METRICS)
    names = split_names(metrics)
    unknown = [m for m in names if m not in ALL_METRICS]
    if unknown or not names:
        problem = f"unknown metric(s) {', '.join(unknown)}" if unknown else f"no metric in {metrics!r}"
        raise ValueError(f"{problem}; give 'all' or '+'-separated names from {'+'.join(ALL_METRICS)}")
    return names


@dataclasses.dataclass(frozen=True)
class EvalJob:
    """One data set: its ground-truth folder, and the (method, prediction folder) pairs scored against it."""

    dataset: str
    gt_dir: str
    methods: tuple[tuple[str, str], ...]


# --------------------------------------------------------------------------- one folder


def _skeleton_reader(gt_dir: str):
    """HCE skeletons from a ``ske`` folder next to ``gt_dir`` when it exists (None: compute them)."""
    ske_dir = os.path.join(os.path.dirname(os.path.normpath(gt_dir)), "ske")
    if not os.path.isdir(ske_dir):
        return None
    by_stem = {os.path.splitext(os.path.basename(f))[0]: f for f in list_images(ske_dir)}
    return lambda stem: read_gray(by_stem[stem]) > 128 if stem in by_stem else None


def evaluate_folder(pred_dir: str, gt_dir: str, metrics, workers: int = 1, desc: str = "",
                    skeletons: dict | None = None, progress: bool = True) -> Evaluator:
    """Scores every prediction in ``pred_dir`` against its ground truth in ``gt_dir``.

    Args:
      skeletons: optional dict shared between calls on the same ``gt_dir``: HCE skeletons are kept
        there (as pixel indices) so that other methods need not recompute them.
    """
    pairs = pair_by_stem(list_images(pred_dir), list_images(gt_dir))
    read_skeleton = _skeleton_reader(gt_dir) if "HCE" in metrics else None

    def score(item):
        stem, pred_path, gt_path = item
        gt = read_gray(gt_path)
        pred = read_gray(pred_path)
        if pred.shape != gt.shape:
            pred = cv2.resize(pred, (gt.shape[1], gt.shape[0]))
        skeleton = None  # without a cache, HCE thins only what it needs
        if "HCE" in metrics:
            if skeletons is not None and stem in skeletons:
                skeleton = np.zeros(gt.shape, bool)
                skeleton.flat[skeletons[stem]] = True
            elif read_skeleton is not None:
                skeleton = read_skeleton(stem)
            if skeletons is not None:
                if skeleton is None:
                    skeleton = skeleton_of(gt)
                skeletons[stem] = np.flatnonzero(skeleton)
        return evaluate_pair(pred, gt, metrics, skeleton, name=stem)

    evaluator = Evaluator(metrics)
    with ThreadPoolExecutor(max(workers, 1)) as pool:
        for result in tqdm(pool.map(score, pairs), total=len(pairs), desc=desc, leave=False, disable=not progress):
            evaluator.add(result)
    return evaluator


# --------------------------------------------------------------------------- checks before any work


def _folders(path: str) -> list[str]:
    """Names of the sub-folders of ``path`` (none if it is not a folder), sorted."""
    if not os.path.isdir(path):
        return []
    return sorted(n for n in os.listdir(path) if os.path.isdir(os.path.join(path, n)))


def _listing(items) -> str:
    return ", ".join(items) if items else "(none)"


def _namer(names: Mapping[str, str] | None) -> Callable[[str], str]:
    """How the messages call a parameter: the caller's name for it (a command-line flag) or its own."""
    return lambda key: (names or {}).get(key, key)


def check_save_dir(save_dir: str, *, names: Mapping[str, str] | None = None) -> None:
    """Creates ``save_dir`` and writes + deletes a probe file there; UsageError if that fails."""
    n = _namer(names)
    if os.path.exists(save_dir) and not os.path.isdir(save_dir):
        raise UsageError(f"{n('save_dir')} {save_dir} is an existing file, not a folder; give a folder to write to")
    try:
        os.makedirs(save_dir, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=save_dir)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise UsageError(f"{n('save_dir')} {save_dir} is not writable ({e.strerror or e}); "
                         "give a folder you can write to") from e


def check_datasets(data_root: str, datasets: Sequence[str], *, pred_root: str | None = None, methods: Names = None,
                   with_images: bool = False, names: Mapping[str, str] | None = None) -> list[str] | None:
    """Checks that every data set has its folders (``gt``, and ``im`` `with_images`) and, given
    `pred_root`, predictions of the methods, before any work.

    Returns the methods to evaluate (`methods`, or every folder of `pred_root`; None without
    `pred_root`); raises UsageError naming every missing one and what exists instead.
    """
    n = _namer(names)
    problems = []
    if not os.path.isdir(data_root):
        raise UsageError(f"{n('data_root')} {data_root} is not a folder")
    needs = ("gt", "im") if with_images else ("gt",)
    have = [d for d in _folders(data_root) if all(os.path.isdir(os.path.join(data_root, d, s)) for s in needs)]
    missing = [d for d in datasets if d not in have]
    if missing:
        layout = "/".join(needs)
        problems.append(f"data set(s) not found under {data_root}: {_listing(missing)} (each needs "
                        f"{os.path.join(data_root, '<name>', layout)}); data sets there: {_listing(have)}. "
                        f"Check {n('datasets')} and {n('data_root')}")
    found = None
    if pred_root is not None:
        if not os.path.isdir(pred_root):
            raise UsageError(f"{n('pred_root')} {pred_root} is not a folder; give the folder of "
                             f"{{method}}/{{dataset}} predictions, or {n('predict')} to predict them first")
        on_disk = _folders(pred_root)
        found = split_names(methods) or on_disk
        unknown = [m for m in found if m not in on_disk]
        if unknown:
            problems.append(f"method(s) not found under {pred_root}: {_listing(unknown)}; methods there: "
                            f"{_listing(on_disk)}. Check {n('methods')}")
        with_preds = sorted({d for m in found for d in _folders(os.path.join(pred_root, m))})
        unpredicted = [d for d in datasets if d not in missing and d not in with_preds]
        if unpredicted and not unknown:
            problems.append(f"no predictions for data set(s) {_listing(unpredicted)} under {pred_root} "
                            f"(looked in {os.path.join(pred_root, '<method>', '<dataset>')} for methods "
                            f"{_listing(found)}); data sets with predictions: {_listing(with_preds)}. "
                            f"Check {n('datasets')} and {n('pred_root')}, or predict them first with {n('predict')}")
    if problems:
        raise UsageError("; ".join(problems))
    return found


# --------------------------------------------------------------------------- scoring and writing


def score_jobs(jobs: Sequence[EvalJob], save_dir: str, metrics: Sequence[str], *, task: str = "DIS5K",
               workers: int = 1, per_image: bool = False, plots: bool = True, progress: bool = True,
               echo: Callable[[str], object] | None = None) -> Results:
    """Scores every job and writes the tables, JSON, CSV (and plots, per-image CSVs) into `save_dir`
    (which must exist); `echo` gets each data set's table as it is done."""
    rows, per_image_records = [], {}
    for job in jobs:
        skeletons: dict | None = {} if len(job.methods) > 1 and "HCE" in metrics else None
        dataset_rows, curves = [], {}
        for method, pred_dir in job.methods:
            ev = evaluate_folder(pred_dir, job.gt_dir, metrics, workers, f"{job.dataset} / {method}", skeletons,
                                 progress=progress)
            res = ev.results()
            dataset_rows.append((job.dataset, method, res))
            curves[method] = res
            if per_image:
                per_image_records[(job.dataset, method)] = [dict(name=p.name, **p.scalars()) for p in ev.pairs]
        table = report.format_table(dataset_rows, task)
        if echo is not None:
            echo(table)
        with open(os.path.join(save_dir, f"{job.dataset}_eval.txt"), "w") as f:
            f.write(table + "\n")
        if plots and "F" in metrics:
            report.plot_curves(os.path.join(save_dir, job.dataset), job.dataset, curves)
        rows.extend(dataset_rows)

    report.write_json(os.path.join(save_dir, "results.json"), rows, task)
    report.write_csv(os.path.join(save_dir, "results.csv"), rows, task)
    for (dataset, method), records in per_image_records.items():
        report.write_per_image_csv(os.path.join(save_dir, f"{dataset}--{method}_per_image.csv"), records)
    return {(d, m): r for d, m, r in rows}


def evaluate_folders(*, pred_dir: str | None = None, gt_dir: str | None = None, data_root: str | None = None,
                     datasets: Names = None, pred_root: str = "e_preds", methods: Names = None,
                     method: str | None = None, predict: Callable[[str, str], object] | None = None,
                     metrics: Names = "all", task: str = "DIS5K", save_dir: str = "e_results", workers: int = 1,
                     per_image: bool = False, plots: bool = True, progress: bool = True,
                     echo: Callable[[str], object] | None = None,
                     names: Mapping[str, str] | None = None) -> Results:
    """Evaluates predictions (see the module doc) and writes the results into `save_dir`.

    Either `pred_dir` and `gt_dir` (one folder each; the data set is named after `gt_dir`, or its
    parent when it is called ``gt``; the method after `pred_dir` unless `method`), or `data_root`
    and `datasets` (names, or one '+'- or ','-separated string) with the predictions of `methods`
    (default: every folder) under `pred_root`.

    predict: with `data_root`, make the predictions first: called as ``predict(im_dir, out_dir)``
      for each data set, after every check, with ``out_dir = {pred_root}/{method}/{dataset}``
      (`method` is then required); only that method is evaluated.
    metrics: 'all' or names from `ALL_METRICS`. task: the original's column order (`report.TASK_COLUMNS`).
    echo: gets each data set's table (e.g. `print`). names: how messages call the parameters, by
      parameter name (the command line passes its flags; default: the parameter names).

    Returns ``{(dataset, method): Evaluator.results()}``. Raises UsageError (a ValueError) for every
    mistake found before any work, PairingError if predictions and ground truths do not pair.
    """
    n = _namer(names)
    chosen = parse_metrics(metrics)
    if bool(pred_dir) != bool(gt_dir):
        raise UsageError(f"{n('pred_dir')} and {n('gt_dir')} go together")
    if pred_dir:
        if predict is not None:
            raise UsageError(f"{n('predict')} needs {n('data_root')} and {n('datasets')}, not {n('pred_dir')}")
        not_folders = [f"{n(key)} {path}" for key, path in (("pred_dir", pred_dir), ("gt_dir", gt_dir))
                       if not os.path.isdir(path)]
        if not_folders:
            raise UsageError(f"not a folder: {', '.join(not_folders)}")
        check_save_dir(save_dir, names=names)
        gt_norm = os.path.normpath(gt_dir)
        dataset = os.path.basename(gt_norm)
        if dataset == "gt":  # {dataset}/gt: name it after the data set
            dataset = os.path.basename(os.path.dirname(gt_norm)) or dataset
        jobs = [EvalJob(dataset, gt_dir, ((method or os.path.basename(os.path.normpath(pred_dir)), pred_dir),))]
    else:
        wanted = split_names(datasets)
        if not data_root or not wanted:
            raise UsageError(f"give {n('pred_dir')} and {n('gt_dir')}, or {n('data_root')} and {n('datasets')} "
                             f"(got {n('datasets')} {datasets!r})")
        if predict is not None and not method:
            raise UsageError(f"name the method whose predictions {n('predict')} makes ({n('method')})")
        found = check_datasets(data_root, wanted, pred_root=None if predict else pred_root, methods=methods,
                               with_images=predict is not None, names=names)
        check_save_dir(save_dir, names=names)
        if predict is not None:
            for dataset in wanted:
                predict(os.path.join(data_root, dataset, "im"), os.path.join(pred_root, method, dataset))
            found = [method]
        jobs = []
        for dataset in wanted:
            pairs = [(m, os.path.join(pred_root, m, dataset)) for m in found]
            pairs = [(m, d) for m, d in pairs if os.path.isdir(d)]  # check_datasets: at least one
            jobs.append(EvalJob(dataset, os.path.join(data_root, dataset, "gt"), tuple(pairs)))
    return score_jobs(jobs, save_dir, chosen, task=task, workers=workers, per_image=per_image, plots=plots,
                      progress=progress, echo=echo)
