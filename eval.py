"""Evaluate saliency / DIS predictions with the standard metrics, as the original BiRefNet evaluator.

Three ways in:

  # one folder of predictions against one folder of ground truths (paired by file name stem)
  python eval.py --pred_dir preds/DIS-VD --gt_dir datasets/DIS5K/DIS-VD/gt

  # the original's layout: {pred_root}/{method}/{dataset}/*.png against {data_root}/{dataset}/gt/*
  python eval.py --pred_root e_preds --data_root datasets/DIS5K --datasets DIS-VD+DIS-TE1

  # predict first (writes {pred_root}/{method}/{dataset}/*.png), then evaluate
  python eval.py --ckpt BiRefNet.safetensors --data_root datasets/DIS5K --datasets DIS-VD

Results: a table per data set on the console (columns in the original's order for --task) and in
{save_dir}/{dataset}_eval.txt, everything at full precision in {save_dir}/results.json and
results.csv, and precision-recall / F-measure curves in {save_dir}/{dataset}_pr.png / _fm.png.
If a folder named ``ske`` sits next to a ground-truth folder, HCE takes the skeletons from it (by stem)
as the original does; otherwise they are computed.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
from tqdm import tqdm

from birefnet_jax.metrics import (
    ALL_METRICS,
    Evaluator,
    evaluate_pair,
    pair_by_stem,
    read_gray,
    report,
    skeleton_of,
)
from birefnet_jax.metrics.io import list_images


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("inputs")
    src.add_argument("--pred_dir", help="one folder of predictions (with --gt_dir)")
    src.add_argument("--gt_dir", help="one folder of ground truths (with --pred_dir)")
    src.add_argument("--data_root", help="folder of data sets, each with gt/ (and im/ for --ckpt)")
    src.add_argument("--datasets", help="data sets under --data_root, separated by '+' or ','")
    src.add_argument("--pred_root", default="e_preds", help="folder of methods, each with one folder per data set")
    src.add_argument("--methods", help="methods under --pred_root ('+'-separated); default: all that have the data set")
    src.add_argument("--ckpt", help="checkpoint: predict every --datasets image first, then evaluate")
    src.add_argument("--method", help="name of the method (default: folder or checkpoint name)")
    src.add_argument("--batch_size", type=int, default=None, help="inference batch size (--ckpt; default: one per "
                     "device)")
    out = p.add_argument_group("evaluation and output")
    out.add_argument("--task", default="DIS5K", help=f"column order: {', '.join(report.TASK_COLUMNS)}")
    out.add_argument("--metrics", default="all", help=f"'all' or '+'-separated from {'+'.join(ALL_METRICS)}")
    out.add_argument("--save_dir", default="e_results", help="where tables, JSON, CSV and plots go")
    out.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="threads reading / scoring")
    out.add_argument("--per_image", action="store_true", help="also write every image's metrics to CSV")
    out.add_argument("--no_plots", action="store_true", help="skip the PR / F-measure plots")
    args = p.parse_args(argv)
    if bool(args.pred_dir) != bool(args.gt_dir):
        p.error("--pred_dir and --gt_dir go together")
    if not args.pred_dir and not (args.data_root and args.datasets):
        p.error("give --pred_dir and --gt_dir, or --data_root and --datasets")
    if not args.pred_dir and not _split(args.datasets):
        p.error(f"--datasets {args.datasets!r} names no data set; give names separated by '+' or ','")
    metrics = _split(args.metrics)
    unknown = [m for m in metrics if m not in ALL_METRICS]
    if args.metrics != "all" and (unknown or not metrics):
        problem = f"unknown metric(s) {', '.join(unknown)}" if unknown else f"no metric in {args.metrics!r}"
        p.error(f"--metrics: {problem}; give 'all' or '+'-separated names from {'+'.join(ALL_METRICS)}")
    return args


class UsageError(ValueError):
    """A mistake in the command line found before any work: a missing data set, an unwritable --save_dir."""


def _split(text: str | None) -> list[str]:
    return [t for t in (text or "").replace(",", "+").split("+") if t]


def _skeleton_reader(gt_dir: str):
    """HCE skeletons from a ``ske`` folder next to ``gt_dir`` when it exists (None: compute them)."""
    ske_dir = os.path.join(os.path.dirname(os.path.normpath(gt_dir)), "ske")
    if not os.path.isdir(ske_dir):
        return None
    by_stem = {os.path.splitext(os.path.basename(f))[0]: f for f in list_images(ske_dir)}
    return lambda stem: read_gray(by_stem[stem]) > 128 if stem in by_stem else None


def evaluate_folder(pred_dir: str, gt_dir: str, metrics, workers: int = 1, desc: str = "",
                    skeletons: dict | None = None) -> Evaluator:
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
        for result in tqdm(pool.map(score, pairs), total=len(pairs), desc=desc, leave=False):
            evaluator.add(result)
    return evaluator


# --------------------------------------------------------------------------- inference (--ckpt)


def predict_dataset(predictor, im_dir: str, out_dir: str, batch_size: int | None = None) -> None:
    """Masks for every image of ``im_dir`` into ``out_dir`` (``<stem>.png`` at the image's size), through
    the package's one inference path (``birefnet_jax.inference.predict``): resized as the original's loader
    does, predicted at the checkpoint's resolution, brought back with corners aligned, truncated to 8 bits.
    Predictions are always redone: a folder of an earlier checkpoint of the same name is not trusted."""
    from birefnet_jax.inference import predict

    summary = predict(im_dir, predictor, out_dir, batch_size=batch_size, overwrite=True, progress=True)
    if summary.failed:
        listing = "; ".join(f"{p.name}: {why}" for p, why in summary.failed[:10])
        raise ValueError(f"{len(summary.failed)} image(s) in {im_dir} could not be predicted ({listing}); "
                         "fix or remove them and run again")


def _folders(path: str) -> list[str]:
    """Names of the sub-folders of ``path`` (none if it is not a folder), sorted."""
    if not os.path.isdir(path):
        return []
    return sorted(n for n in os.listdir(path) if os.path.isdir(os.path.join(path, n)))


def _names(items) -> str:
    return ", ".join(items) if items else "(none)"


def check_save_dir(save_dir: str) -> None:
    """Creates ``save_dir`` and writes + deletes a probe file there; UsageError if that fails."""
    if os.path.exists(save_dir) and not os.path.isdir(save_dir):
        raise UsageError(f"--save_dir {save_dir} is an existing file, not a folder; give a folder to write to")
    try:
        os.makedirs(save_dir, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=save_dir)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise UsageError(f"--save_dir {save_dir} is not writable ({e.strerror or e}); "
                         "give a folder you can write to") from e


def check_datasets(args, datasets: list[str]) -> list[str] | None:
    """Checks that every data set has its folders (and, without --ckpt, predictions) before any work.

    Returns the methods to evaluate (None with --ckpt); raises UsageError naming every missing one
    and what exists instead.
    """
    problems = []
    if not os.path.isdir(args.data_root):
        raise UsageError(f"--data_root {args.data_root} is not a folder")
    needs = ("gt", "im") if args.ckpt else ("gt",)
    have = [d for d in _folders(args.data_root) if all(os.path.isdir(os.path.join(args.data_root, d, s))
                                                        for s in needs)]
    missing = [d for d in datasets if d not in have]
    if missing:
        layout = "/".join(needs)
        problems.append(f"data set(s) not found under {args.data_root}: {_names(missing)} (each needs "
                        f"{os.path.join(args.data_root, '<name>', layout)}); data sets there: {_names(have)}. "
                        "Check --datasets and --data_root")
    methods = None
    if not args.ckpt:
        if not os.path.isdir(args.pred_root):
            raise UsageError(f"--pred_root {args.pred_root} is not a folder; give the folder of "
                             "{method}/{dataset} predictions, or --ckpt to predict them first")
        on_disk = _folders(args.pred_root)
        methods = _split(args.methods) or on_disk
        unknown = [m for m in methods if m not in on_disk]
        if unknown:
            problems.append(f"method(s) not found under {args.pred_root}: {_names(unknown)}; methods there: "
                            f"{_names(on_disk)}. Check --methods")
        with_preds = sorted({d for m in methods for d in _folders(os.path.join(args.pred_root, m))})
        unpredicted = [d for d in datasets if d not in missing and d not in with_preds]
        if unpredicted and not unknown:
            problems.append(f"no predictions for data set(s) {_names(unpredicted)} under {args.pred_root} "
                            f"(looked in {os.path.join(args.pred_root, '<method>', '<dataset>')} for methods "
                            f"{_names(methods)}); data sets with predictions: {_names(with_preds)}. "
                            "Check --datasets and --pred_root, or predict them first with --ckpt")
    if problems:
        raise UsageError("; ".join(problems))
    return methods


def main(argv=None) -> dict:
    """Runs the evaluation; raises UsageError (a ValueError) for command-line mistakes, before any work."""
    args = parse_args(argv)
    metrics = list(ALL_METRICS) if args.metrics == "all" else _split(args.metrics)

    # (dataset, gt folder) and, per dataset, (method, prediction folder).
    jobs: list[tuple[str, str, list[tuple[str, str]]]] = []
    if args.pred_dir:
        not_folders = [f"{flag} {path}" for flag, path in (("--pred_dir", args.pred_dir), ("--gt_dir", args.gt_dir))
                       if not os.path.isdir(path)]
        if not_folders:
            raise UsageError(f"not a folder: {', '.join(not_folders)}")
        check_save_dir(args.save_dir)
        gt_dir = os.path.normpath(args.gt_dir)
        dataset = os.path.basename(gt_dir)
        if dataset == "gt":  # {dataset}/gt: name it after the data set
            dataset = os.path.basename(os.path.dirname(gt_dir)) or dataset
        method = args.method or os.path.basename(os.path.normpath(args.pred_dir))
        jobs.append((dataset, args.gt_dir, [(method, args.pred_dir)]))
    else:
        datasets = _split(args.datasets)
        methods = check_datasets(args, datasets)
        check_save_dir(args.save_dir)
        if args.ckpt:
            from birefnet_jax.inference.predictor import load_predictor  # only this path needs the model

            predictor = load_predictor(args.ckpt)
            method = args.method or os.path.splitext(os.path.basename(args.ckpt))[0]
            for dataset in datasets:
                predict_dataset(predictor, os.path.join(args.data_root, dataset, "im"),
                                os.path.join(args.pred_root, method, dataset), args.batch_size)
            methods = [method]
        for dataset in datasets:
            found = [(m, os.path.join(args.pred_root, m, dataset)) for m in methods]
            found = [(m, d) for m, d in found if os.path.isdir(d)]  # check_datasets: at least one
            jobs.append((dataset, os.path.join(args.data_root, dataset, "gt"), found))

    rows, per_image = [], {}
    for dataset, gt_dir, methods in jobs:
        skeletons: dict | None = {} if len(methods) > 1 and "HCE" in metrics else None
        dataset_rows, curves = [], {}
        for method, pred_dir in methods:
            ev = evaluate_folder(pred_dir, gt_dir, metrics, args.workers, f"{dataset} / {method}", skeletons)
            res = ev.results()
            dataset_rows.append((dataset, method, res))
            curves[method] = res
            if args.per_image:
                per_image[(dataset, method)] = [dict(name=p.name, **p.scalars()) for p in ev.pairs]
        table = report.format_table(dataset_rows, args.task)
        print(table)
        with open(os.path.join(args.save_dir, f"{dataset}_eval.txt"), "w") as f:
            f.write(table + "\n")
        if not args.no_plots and "F" in metrics:
            report.plot_curves(os.path.join(args.save_dir, dataset), dataset, curves)
        rows.extend(dataset_rows)

    report.write_json(os.path.join(args.save_dir, "results.json"), rows, args.task)
    report.write_csv(os.path.join(args.save_dir, "results.csv"), rows, args.task)
    for (dataset, method), records in per_image.items():
        report.write_per_image_csv(os.path.join(args.save_dir, f"{dataset}--{method}_per_image.csv"), records)
    return {(d, m): r for d, m, r in rows}


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:  # bad inputs: a clear message, not a traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
