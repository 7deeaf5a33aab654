"""The `birefnet-jax` command: `convert`, `verify`, `predict` and `export`.

Sizes are written WIDTHxHEIGHT, as the original's `--resolution` (e.g. 2560x1440).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from birefnet_jax.inference.buckets import parse_size


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as _version

    try:
        return _version("birefnet-jax")
    except PackageNotFoundError:  # running from a source tree that was not installed
        return "unknown (not installed)"


def parse_heads(text: str) -> tuple[int, ...]:
    try:
        heads = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected four comma-separated counts, e.g. 1,2,5,8") from None
    if len(heads) != 4 or min(heads) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: PVT v2 has four stages; give four positive counts, e.g. 1,2,5,8")
    return heads


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
    g.add_argument("--num-heads", type=parse_heads, default=None,
                   help="PVT v2 heads per stage, e.g. 1,2,5,8 (non-preset widths)")
    g.add_argument("--resolution", type=parse_size, default=None, help=resolution_help)


def cmd_convert(args) -> int:
    from birefnet_jax.checkpoint import save_model
    from birefnet_jax.config import backbone_name
    from birefnet_jax.convert import model_to_state_dict, write_safetensors
    from birefnet_jax.loading import load

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
        from birefnet_jax.checkpoint import check_replaceable

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
    from birefnet_jax.verify import verify

    results = verify(args.checkpoint, args.reference, tolerance=args.tolerance, **_overrides(args))
    ok = True
    for r in results:
        status = "ok" if r.passed else "FAIL"
        print(f"{r.name:12s} {str(r.shape):22s} rel. error {r.rel_error:.3e}  {status}")
        ok &= r.passed
    print(("parity verified" if ok else "parity NOT verified") + f" (tolerance {args.tolerance:g})")
    return 0 if ok else 1


def parse_resolution(text: str):
    return "auto" if text == "auto" else parse_size(text)


def cmd_predict(args) -> int:
    import jax

    from birefnet_jax.inference import predict

    if args.compile_cache:
        jax.config.update("jax_compilation_cache_dir", str(args.compile_cache))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    kinds = [k for k, on in (("mask", not args.no_mask), ("cutout", args.cutout), ("prob", args.prob)) if on]
    if not kinds:
        raise ValueError("nothing to write: --no-mask without --cutout or --prob")
    dtype = {"float32": None, "bfloat16": "bfloat16"}[args.dtype]
    summary = predict(args.inputs, args.model, args.output, resolution=args.resolution, max_pixels=args.max_pixels,
                      bucket_step=args.bucket_step, batch_size=args.batch_size, dtype=dtype, outputs=kinds,
                      refine_radius=args.refine_radius, overwrite=args.overwrite, workers=args.workers,
                      max_image_pixels=args.max_image_pixels or None, progress=not args.quiet,
                      crop_refine=args.crop_refine, crop_margin=args.crop_margin)
    print(summary.report(), file=sys.stderr if summary.failed else sys.stdout)
    return 0 if summary.ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="birefnet-jax", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("convert", help="original .pth/.safetensors -> Orbax checkpoint (or back to .safetensors)")
    p.add_argument("src", help=".pth, .safetensors, hf:<owner>/<repo>[/<file>] or an Orbax checkpoint folder")
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

    p = sub.add_parser("predict", help="masks / cut-outs for images, folders, globs, list files and videos",
                       description="Predict masks for every image (and video) of the inputs, writing a tree that "
                                   "mirrors them under --output. Existing outputs are skipped, so a rerun resumes. "
                                   "Exit status 1 if any input failed (each is named with its reason).")
    p.add_argument("inputs", nargs="+", help="image or video files, folders (recursive), globs, or .txt lists")
    p.add_argument("-m", "--model", required=True,
                   help="Orbax checkpoint folder, .pth, .safetensors, or hf:<owner>/<repo>[/<file>]")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--resolution", type=parse_resolution, default=None,
                   help="model input size: WxH (multiples of 32), or 'auto' (each image's own size up to "
                        "--max-pixels, in buckets of --bucket-step); default: the checkpoint's")
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
    p.add_argument("--compile-cache", type=Path, default=None, help="persist compiled programs in this folder")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_predict)

    from birefnet_jax.inference.export import add_export_arguments, run_export

    p = sub.add_parser("export", help="serialized StableHLO program (jax.export) or TF SavedModel for serving")
    add_export_arguments(p)
    p.set_defaults(func=run_export)
    return parser


def main(argv=None) -> int:
    from birefnet_jax._optional import MissingDependency

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, NotADirectoryError, MissingDependency) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
