"""The `birefnet-jax` command: `convert`, `verify`, `predict`, `export`, `eval` and `models`.

Sizes are written WIDTHxHEIGHT, as the original's `--resolution` (e.g. 2560x1440).
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import sys
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version
from pathlib import Path

import jax

from birefnet_jax._optional import MissingDependency, require
from birefnet_jax.checkpoint import check_replaceable, save_model
from birefnet_jax.config import backbone_name
from birefnet_jax.convert import model_to_state_dict, write_safetensors
from birefnet_jax.inference import distributed
from birefnet_jax.inference.buckets import parse_size
from birefnet_jax.inference.export import (
    LAYOUTS,
    PLATFORMS,
    WEIGHTS_MODES,
    check_platforms,
    export_saved_model,
    export_to_file,
)
from birefnet_jax.inference.exported import sidecar_paths
from birefnet_jax.inference.pipeline import PredictOptions, predict
from birefnet_jax.inference.predictor import load_predictor
from birefnet_jax.loading import load
from birefnet_jax.pretrained import RELEASES, all_names, table_rows
from birefnet_jax.verify import verify


def version() -> str:
    try:
        return _version("birefnet-jax")
    except PackageNotFoundError:  # running from a source tree that was not installed
        return "unknown (not installed)"


# --------------------------------------------------------------------------------------------------
# Parsing values: the library's parsers raise ValueError; argparse wants ArgumentTypeError.


def argument_type(parse: Callable[[str], object]) -> Callable[[str], object]:
    """`parse` as an argparse `type=`: its ValueError becomes the usage error, message kept."""

    @functools.wraps(parse)
    def parse_argument(text: str):
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return parse_argument


def parse_heads(text: str) -> tuple[int, ...]:
    """'1,2,5,8' -> PVT v2's heads per stage; ValueError otherwise."""
    try:
        heads = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"{text!r}: expected four comma-separated counts, e.g. 1,2,5,8") from None
    if len(heads) != 4 or min(heads) < 1:
        raise ValueError(f"{text!r}: PVT v2 has four stages; give four positive counts, e.g. 1,2,5,8")
    return heads


def parse_resolution(text: str):
    """'auto' or WIDTHxHEIGHT (see `parse_size`)."""
    return "auto" if text == "auto" else parse_size(text)


def parse_batch(text: str) -> int | None:
    """A positive batch size, or None for 'dynamic' (a symbolic batch); ValueError otherwise."""
    if text.lower() in ("dynamic", "symbolic", "none"):
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"{text!r}: expected a positive batch size or 'dynamic'")
    return value


def parse_platforms(text: str) -> tuple[str, ...]:
    """'cpu,cuda' -> ('cpu', 'cuda'); ValueError for a platform JAX cannot lower for."""
    return check_platforms([p for p in text.split(",") if p.strip()])


# --------------------------------------------------------------------------------------------------
# convert, verify


def _overrides(args) -> dict:
    out = {}
    if args.mul_scl_ipt is not None:
        out["mul_scl_ipt"] = "" if args.mul_scl_ipt == "none" else args.mul_scl_ipt
    if args.num_heads:
        out["num_heads"] = args.num_heads
    if args.resolution:
        out["resolution"] = args.resolution
    return out


def _add_arch_flags(p, resolution_help: str):
    g = p.add_argument_group("architecture overrides (what the weights cannot tell)")
    g.add_argument("--mul-scl-ipt", choices=["none", "add", "cat"], default=None,
                   help="multi-scale input; 'add' and none leave identical weights (default: none unless 'cat')")
    g.add_argument("--num-heads", type=argument_type(parse_heads), default=None,
                   help="PVT v2 heads per stage, e.g. 1,2,5,8 (non-preset widths)")
    g.add_argument("--resolution", type=argument_type(parse_size), default=None, help=resolution_help)


def cmd_convert(args) -> int:
    src, dst = Path(args.src), Path(args.dst)
    if src.exists() and dst.exists() and src.resolve() == dst.resolve():
        raise FileExistsError(f"{dst} is the source itself; choose another destination")
    if dst.suffix == ".safetensors":
        if dst.is_dir():
            raise FileExistsError(f"{dst} is a folder; give a file path ending in .safetensors")
        if dst.exists() and not args.force:
            raise FileExistsError(f"{dst} exists (use --force to replace it)")
    elif dst.exists() or dst.is_symlink():
        if not args.force:
            raise FileExistsError(f"{dst} exists (use --force to replace a checkpoint this tool wrote)")
        check_replaceable(dst.absolute(), (src.absolute(),))  # before the (slow) conversion

    model = load(args.src, **_overrides(args))
    cfg = model.cfg
    name = backbone_name(cfg.backbone) or f"custom {cfg.backbone.kind}"
    print(f"architecture: {name}, mul_scl_ipt={cfg.mul_scl_ipt!r}, cxt_num={cfg.cxt_num}, "
          f"squeeze={cfg.squeeze_block!r}, dec_blk={cfg.dec_blk}, dec_att={cfg.dec_att!r}, "
          f"batch_norm={cfg.batch_norm}, resolution={cfg.resolution[1]}x{cfg.resolution[0]}")
    if dst.suffix == ".safetensors":
        write_safetensors(model_to_state_dict(model), dst)
    else:
        save_model(model, dst, overwrite=args.force, extra={"source": src.name}, protect=(src.absolute(),))
    print(f"wrote {dst}")
    return 0


def cmd_verify(args) -> int:
    results = verify(args.checkpoint, args.reference, tolerance=args.tolerance, **_overrides(args))
    ok = True
    for r in results:
        status = "ok" if r.passed else "FAIL"
        print(f"{r.name:12s} {str(r.shape):22s} rel. error {r.rel_error:.3e}  {status}")
        ok &= r.passed
    print(("parity verified" if ok else "parity NOT verified") + f" (tolerance {args.tolerance:g})")
    return 0 if ok else 1


# --------------------------------------------------------------------------------------------------
# predict


# How PredictOptions' messages name its fields, and the flags that set them here.
PREDICT_FLAGS = {"resolution": "--resolution", "max_pixels": "--max-pixels", "bucket_step": "--bucket-step",
                 "batch_size": "--batch-size", "refine_radius": "--refine-radius", "workers": "--workers",
                 "max_image_pixels": "--max-image-pixels", "crop_margin": "--crop-margin"}


def predict_options(args) -> PredictOptions:
    """The PredictOptions the flags ask for; a ValueError names the flag (`--refine-radius`), not
    the option's field."""
    kinds = [k for k, on in (("mask", not args.no_mask), ("cutout", args.cutout), ("prob", args.prob)) if on]
    if not kinds:
        raise ValueError("nothing to write: --no-mask without --cutout or --prob")
    if args.max_image_pixels is not None and args.max_image_pixels < 0:
        raise ValueError(f"--max-image-pixels must be a positive pixel count, or 0 for no limit; got "
                         f"{args.max_image_pixels}")
    dtype = {"float32": None, "bfloat16": "bfloat16"}[args.dtype]
    try:
        return PredictOptions(resolution=args.resolution, max_pixels=args.max_pixels, bucket_step=args.bucket_step,
                              batch_size=args.batch_size, dtype=dtype, outputs=kinds,
                              refine_radius=args.refine_radius, overwrite=args.overwrite, workers=args.workers,
                              max_image_pixels=args.max_image_pixels or None, progress=not args.quiet,
                              crop_refine=args.crop_refine, crop_margin=args.crop_margin,
                              compile_cache=False if args.no_compile_cache else args.compile_cache or True)
    except ValueError as e:
        words = re.compile(r"\b(" + "|".join(PREDICT_FLAGS) + r")\b")
        raise ValueError(words.sub(lambda m: PREDICT_FLAGS[m[1]], str(e))) from None


def check_distributed_flags(args) -> None:
    """ValueError for --num-processes / --process-id that cannot work (before any work).
    --coordinator-address implies --distributed, as train.py's does."""
    given = [f for f, v in (("--num-processes", args.num_processes), ("--process-id", args.process_id))
             if v is not None]
    if given and not (args.distributed or args.coordinator_address):
        raise ValueError(f"{' and '.join(given)} go with --distributed")
    if args.num_processes is not None and args.num_processes < 1:
        raise ValueError(f"--num-processes must be at least 1, got {args.num_processes}")
    if args.process_id is not None and (args.process_id < 0 or (args.num_processes is not None
                                                                and args.process_id >= args.num_processes)):
        raise ValueError(f"--process-id must be 0 to --num-processes - 1, got {args.process_id}")


def _check_predict(args) -> None:
    check_distributed_flags(args)
    predict_options(args)


def cmd_predict(args) -> int:
    options = predict_options(args)
    if args.distributed or args.coordinator_address:  # before anything touches a device (the checks do not)
        distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
    if jax.process_count() > 1:
        return _predict_share(args, options)
    summary = predict(args.inputs, args.model, args.output, options=options)
    print(summary.report(), file=sys.stderr if summary.failed else sys.stdout)
    return 0 if summary.ok else 1


def _predict_share(args, options: PredictOptions) -> int:
    """One of several processes (--distributed): its share predicted and its summary printed with
    its index; then every process waits for the slowest (leaving early would abort the others: see
    `birefnet_jax.inference.distributed`), and process 0 prints the total: its exit status covers
    every process."""
    index, count = jax.process_index(), jax.process_count()
    try:
        summary = predict(args.inputs, args.model, args.output, options=options)
    except KeyboardInterrupt:
        distributed.publish(None)  # process 0 is not left waiting for this one
        raise
    except Exception as e:
        distributed.publish(None)
        print(f"[process {index}/{count}] error: {e} (exiting once the other processes are done)",
              file=sys.stderr, flush=True)
        distributed.gather()
        raise
    distributed.publish(summary)
    print(distributed.prefixed(summary.report(), index, count), file=sys.stderr if summary.failed else sys.stdout,
          flush=True)
    outcomes = distributed.gather()
    if index != 0:
        return 0 if summary.ok else 1
    line, all_ok = distributed.total_report(outcomes)
    print(line, file=sys.stdout if all_ok else sys.stderr, flush=True)
    return 0 if summary.ok and all_ok else 1


def _add_predict(sub) -> None:
    p = sub.add_parser("predict", help="masks / cut-outs for images, folders, globs, list files and videos",
                       description="Predict masks for every image (and video) of the inputs, writing a tree that "
                                   "mirrors them under --output. Existing outputs are skipped, so a rerun resumes. "
                                   "Exit status 1 if any input failed (each is named with its reason).")
    p.add_argument("inputs", nargs="+", help="image or video files, folders (recursive), globs, or .txt lists")
    p.add_argument("-m", "--model", required=True,
                   help="Orbax checkpoint folder, .pth, .safetensors, hf:<owner>/<repo>[/<file>], or a released "
                        "checkpoint's name (birefnet-jax models), e.g. BiRefNet_HR")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--resolution", type=argument_type(parse_resolution), default=None,
                   help="model input size: WxH (multiples of 32), or 'auto' (each image's own size up to "
                        "--max-pixels, in buckets of --bucket-step); default: the checkpoint's ('auto' for the dynamic "
                        "releases)")
    p.add_argument("--max-pixels", type=int, default=None, help="with --resolution auto (default: the checkpoint's)")
    p.add_argument("--bucket-step", type=int, default=128, help="with --resolution auto: side granularity "
                   "(multiple of 32; coarser = fewer compilations)")
    p.add_argument("--batch-size", type=int, default=None, help="images per step (default: one per device)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--cutout", action="store_true",
                   help="also write RGBA cut-outs (<name>_cutout.png; videos: <name>_cutout.mkv)")
    p.add_argument("--prob", action="store_true", help="also write float32 probabilities (<name>.npy; images only)")
    p.add_argument("--no-mask", action="store_true",
                   help="do not write the 8-bit masks (<name>.png; videos: <name>_mask.mkv)")
    p.add_argument("--refine-radius", type=int, default=90, help="foreground refinement window for cut-outs")
    p.add_argument("--crop-refine", action="store_true",
                   help="predict again on the object's bounding box cut from the full-resolution image")
    p.add_argument("--crop-margin", type=float, default=0.1, help="with --crop-refine: margin, share of the box")
    p.add_argument("--overwrite", action="store_true", help="redo images whose outputs exist")
    p.add_argument("--workers", type=int, default=None, help="decoding / writing threads")
    p.add_argument("--max-image-pixels", type=int, default=400_000_000,
                   help="refuse images larger than this (0: no limit)")
    cache = p.add_mutually_exclusive_group()
    cache.add_argument("--compile-cache", type=Path, default=None, metavar="DIR",
                       help="keep compiled programs in this folder across runs (default: ~/.cache/birefnet-jax/xla, "
                            "or $BIREFNET_JAX_CACHE/xla; JAX's $JAX_COMPILATION_CACHE_DIR if set)")
    cache.add_argument("--no-compile-cache", action="store_true",
                       help="compile anew in each run, keeping nothing on disk")
    g = p.add_argument_group("many hosts (each process predicts its share of the inputs into the same output folder)")
    g.add_argument("--distributed", action="store_true",
                   help="initialise jax.distributed: the cluster is read from the environment (TPU pods, SLURM, "
                        "Open MPI) or from the three flags below")
    g.add_argument("--coordinator-address", default=None, help="host:port of process 0 (where not detected)")
    g.add_argument("--num-processes", type=int, default=None, help="number of processes (where not detected)")
    g.add_argument("--process-id", type=int, default=None, help="this process's index (where not detected)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_predict, validate=_check_predict)  # every flag checked before any work


# --------------------------------------------------------------------------------------------------
# export


def cmd_export(args) -> int:
    """Load the checkpoint, export, write; refuses to replace OUTPUT without --force."""
    output = Path(args.output)
    platforms = args.platforms
    if args.saved_model:
        require("tensorflow", "export --saved-model")  # before the (slow) load
        if output.exists() and not args.force:
            raise FileExistsError(f"{output} exists (use --force to replace it)")
    else:
        if output.is_dir():
            raise FileExistsError(f"{output} is a folder; give a file path such as {output / 'model.jaxexport'}")
        existing = [p for p in (output, sidecar_paths(output)[0]) if p.exists()]
        if existing and not args.force:
            raise FileExistsError(f"{existing[0]} exists (use --force to replace it)")

    model = load(args.checkpoint)
    h, w = args.resolution or tuple(model.cfg.resolution)
    options = dict(batch=args.batch, resolution=(h, w), dtype=args.dtype, layout=args.layout,
                   uint8_input=args.uint8_input, platforms=platforms)
    batch = "dynamic" if args.batch is None else args.batch
    if args.saved_model:
        export_saved_model(model, output, overwrite=args.force, **options)
        print(f"wrote SavedModel {output} (batch {batch}, {w}x{h}, {args.layout}, {args.dtype})")
        return 0
    path = export_to_file(model, output, weights=args.weights, **options)
    sidecar, weights_path = sidecar_paths(path)
    size = path.stat().st_size / 2**20
    extra = f" and {weights_path}" if args.weights == "argument" else ""
    print(f"wrote {path} ({size:.1f} MiB; batch {batch}, {w}x{h}, {args.layout}, {args.dtype}), {sidecar}{extra}")
    return 0


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="serialized StableHLO program (jax.export) or TF SavedModel for serving")
    p.add_argument("checkpoint", help=".pth, .safetensors or an Orbax checkpoint folder")
    p.add_argument("output", help="program file (e.g. model.jaxexport; a .json sidecar is written beside it), "
                                  "or a folder with --saved-model")
    p.add_argument("--batch", type=argument_type(parse_batch), default=1,
                   help="images per call, or 'dynamic' for any batch size (default 1)")
    p.add_argument("--resolution", type=argument_type(parse_size), default=None,
                   help="input size WIDTHxHEIGHT, multiples of 32 (default: the checkpoint's training size)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="compute dtype (outputs are float32 either way)")
    p.add_argument("--weights", choices=list(WEIGHTS_MODES), default="embedded",
                   help="embedded: constants of the program; argument: a .weights.npz beside it, passed "
                        "at call time (see the sidecar's weights_order)")
    p.add_argument("--layout", choices=list(LAYOUTS), default="NHWC", help="image layout (default NHWC)")
    p.add_argument("--uint8-input", action="store_true",
                   help="take uint8 RGB 0..255 (normalised inside) and return probabilities")
    p.add_argument("--platforms", type=argument_type(parse_platforms), default=None,
                   help=f"comma-separated lowering platforms, some of {','.join(PLATFORMS)}, e.g. cpu,cuda "
                        "(default: this machine's)")
    p.add_argument("--saved-model", action="store_true",
                   help="write a TensorFlow SavedModel folder instead (needs birefnet-jax[train])")
    p.add_argument("--force", action="store_true", help="replace an existing output")
    p.set_defaults(func=cmd_export)


# --------------------------------------------------------------------------------------------------
# eval (the metrics need the `eval` extra: imported only by this command)

EVAL_DESCRIPTION = """\
Evaluate saliency / DIS predictions with the standard metrics, as the original BiRefNet evaluator.

Three ways in:

  # one folder of predictions against one folder of ground truths (paired by file name stem)
  birefnet-jax eval --pred_dir preds/DIS-VD --gt_dir datasets/DIS5K/DIS-VD/gt

  # the original's layout: {pred_root}/{method}/{dataset}/*.png against {data_root}/{dataset}/gt/*
  birefnet-jax eval --pred_root e_preds --data_root datasets/DIS5K --datasets DIS-VD+DIS-TE1

  # predict first (writes {pred_root}/{method}/{dataset}/*.png), then evaluate
  birefnet-jax eval --ckpt BiRefNet.safetensors --data_root datasets/DIS5K --datasets DIS-VD

(`python eval.py ...` takes the same flags.) Results: a table per data set on the console (columns
in the original's order for --task) and in {save_dir}/{dataset}_eval.txt, everything at full
precision in {save_dir}/results.json and results.csv, and precision-recall / F-measure curves in
{save_dir}/{dataset}_pr.png / _fm.png. If a folder named `ske` sits next to a ground-truth folder,
HCE takes the skeletons from it (by stem) as the original does; otherwise they are computed.
Needs the `eval` extra: pip install 'birefnet-jax[eval]'.
"""

# Spelled here so that `--help` works without the `eval` extra; tests/test_eval.py checks them against
# birefnet_jax.metrics (ALL_METRICS, report.TASK_COLUMNS).
EVAL_METRICS = ("S", "MAE", "E", "F", "WF", "MBA", "BIoU", "MSE", "HCE")
EVAL_TASKS = ("DIS5K", "COD", "HRSOD", "General", "General-2K", "Matting", "Others")
# How the library's messages name its parameters here.
EVAL_FLAGS = {name: f"--{name}" for name in ("pred_dir", "gt_dir", "data_root", "datasets", "pred_root", "methods",
                                              "method", "save_dir")} | {"predict": "--ckpt"}


def _split(text: str | None) -> list[str]:
    return [t for t in (text or "").replace(",", "+").split("+") if t]


def _check_eval(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The flag combinations argparse cannot check: usage errors (exit 2) before any work."""
    from birefnet_jax.metrics.folders import parse_metrics  # optional part (the `eval` extra: OpenCV, ...)

    if bool(args.pred_dir) != bool(args.gt_dir):
        parser.error("--pred_dir and --gt_dir go together")
    if not args.pred_dir and not (args.data_root and args.datasets):
        parser.error("give --pred_dir and --gt_dir, or --data_root and --datasets")
    if not args.pred_dir and not _split(args.datasets):
        parser.error(f"--datasets {args.datasets!r} names no data set; give names separated by '+' or ','")
    if args.pred_dir and args.ckpt:
        parser.error("--ckpt predicts the images of --data_root's data sets; with --pred_dir there is nothing "
                     "to predict")
    try:
        parse_metrics(args.metrics)
    except ValueError as e:
        parser.error(f"--metrics: {e}")


class _DatasetPredictor:
    """`predict(im_dir, out_dir)` for `evaluate_folders`: masks for every image of `im_dir` into `out_dir`
    (``<stem>.png`` at the image's size) through the package's one inference path, the checkpoint loaded
    on the first call (after every check). Predictions are always redone: a folder of an earlier
    checkpoint of the same name is not trusted."""

    def __init__(self, ckpt: str, batch_size: int | None):
        self.ckpt, self.batch_size, self.predictor = ckpt, batch_size, None

    def __call__(self, im_dir: str, out_dir: str) -> None:
        if self.predictor is None:
            self.predictor = load_predictor(self.ckpt)
        summary = predict(im_dir, self.predictor, out_dir, batch_size=self.batch_size, overwrite=True, progress=True,
                          compile_cache=True)
        if summary.failed:
            listing = "; ".join(f"{p.name}: {why}" for p, why in summary.failed[:10])
            raise ValueError(f"{len(summary.failed)} image(s) in {im_dir} could not be predicted ({listing}); "
                             "fix or remove them and run again")


def run_eval(args: argparse.Namespace) -> dict:
    """`birefnet-jax eval`'s work: {(dataset, method): results}; raises like `evaluate_folders`."""
    from birefnet_jax.metrics.folders import evaluate_folders  # optional part (the `eval` extra: OpenCV, ...)

    method, predict_dataset = args.method, None
    if args.ckpt:
        predict_dataset = _DatasetPredictor(args.ckpt, args.batch_size)
        method = method or os.path.splitext(os.path.basename(args.ckpt))[0]
    return evaluate_folders(pred_dir=args.pred_dir, gt_dir=args.gt_dir, data_root=args.data_root,
                            datasets=args.datasets, pred_root=args.pred_root, methods=args.methods, method=method,
                            predict=predict_dataset, metrics=args.metrics, task=args.task, save_dir=args.save_dir,
                            workers=args.workers, per_image=args.per_image, plots=not args.no_plots, echo=print,
                            names=EVAL_FLAGS)


def cmd_eval(args: argparse.Namespace) -> int:
    run_eval(args)
    return 0


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="score predictions against ground truths with the DIS metrics (the `eval` extra)",
                       description=EVAL_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    out.add_argument("--task", default="DIS5K", help=f"column order: {', '.join(EVAL_TASKS)}")
    out.add_argument("--metrics", default="all", help=f"'all' or '+'-separated from {'+'.join(EVAL_METRICS)}")
    out.add_argument("--save_dir", default="e_results", help="where tables, JSON, CSV and plots go")
    out.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="threads reading / scoring")
    out.add_argument("--per_image", action="store_true", help="also write every image's metrics to CSV")
    out.add_argument("--no_plots", action="store_true", help="skip the PR / F-measure plots")
    p.set_defaults(func=cmd_eval, validate=functools.partial(_check_eval, p))


# --------------------------------------------------------------------------------------------------
# models

MODEL_COLUMNS = ("name", "backbone", "resolution", "task", "hub repository", "release file")


def models_table(markdown: bool = False) -> str:
    """The released checkpoints as an aligned text table, or a markdown one."""
    rows = [(f"{r[0]}*" if RELEASES[r[0]].note and not markdown else r[0], *r[1:]) for r in table_rows()]
    if markdown:
        lines = ["| " + " | ".join(MODEL_COLUMNS) + " |", "|" + "---|" * len(MODEL_COLUMNS)]
        lines += ["| " + " | ".join(f"`{v}`" if v != "-" and i in (0, 4, 5) else v for i, v in enumerate(row)) + " |"
                  for row in rows]
        return "\n".join(lines)
    widths = [max(len(row[i]) for row in (MODEL_COLUMNS, *rows)) for i in range(len(MODEL_COLUMNS))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in (MODEL_COLUMNS, *rows)]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def cmd_models(args) -> int:
    print(models_table(markdown=args.markdown))
    if args.markdown:
        return 0
    aliases = [f"{a} (= {r.name})" for r in RELEASES.values() for a in r.aliases]
    print(f"\nalso accepted: {', '.join(aliases)}")
    for r in RELEASES.values():
        if r.note:
            print(f"* {r.name}: {r.note}")
    print("\nrun one by name (fetched from its hub repository and cached): birefnet-jax predict -m BiRefNet_HR "
          "IMAGES -o OUT\noffline: download https://huggingface.co/<hub repository>/resolve/main/model.safetensors, "
          "keep it named <name>.safetensors, and pass -m /path/to/<name>.safetensors")
    return 0


def _add_models(sub) -> None:
    p = sub.add_parser("models", help="list the released checkpoints (names for -m / load)",
                       description="The checkpoints the BiRefNet authors release: each name works as predict's -m, "
                                   "convert's source and birefnet_jax.load(name), with the resolution it was "
                                   f"trained at. Names: {', '.join(all_names())}.")
    p.add_argument("--markdown", action="store_true", help="print a markdown table")
    p.set_defaults(func=cmd_models)


# --------------------------------------------------------------------------------------------------
# The command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="birefnet-jax", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("convert", help="original .pth/.safetensors -> Orbax checkpoint (or back to .safetensors)")
    p.add_argument("src", help=".pth, .safetensors, hf:<owner>/<repo>[/<file>], a released checkpoint's name "
                               "(birefnet-jax models) or an Orbax checkpoint folder")
    p.add_argument("dst", help="Orbax checkpoint folder, or a .safetensors path for a PyTorch-layout export")
    p.add_argument("--force", action="store_true",
                   help="replace dst if it is a checkpoint this tool wrote (never any other folder)")
    _add_arch_flags(p, "training resolution WxH recorded in the config, e.g. 2048x2048")
    p.set_defaults(func=cmd_convert)
    p = sub.add_parser("verify", help="compare a checkpoint's logits with the original's (reference .npz)")
    p.add_argument("checkpoint")
    p.add_argument("reference", help=".npz with input<i> (NCHW, normalised) and output<i> (NCHW logits)")
    p.add_argument("--tolerance", type=float, default=1e-4, help="max relative L2 error (default 1e-4)")
    _add_arch_flags(p, "resolution WxH recorded in the config (does not change the verified logits)")
    p.set_defaults(func=cmd_verify)
    _add_predict(sub)
    _add_export(sub)
    _add_eval(sub)
    _add_models(sub)
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    """The command line parsed and checked (argparse's usage errors exit 2, as always)."""
    args = build_parser().parse_args(argv)
    validate = getattr(args, "validate", None)
    if validate is not None:
        validate(args)
    return args


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, NotADirectoryError, MissingDependency) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
