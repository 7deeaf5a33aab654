"""The `birefnet-jax` command: `convert` and `verify`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _overrides(args) -> dict:
    out = {}
    if args.mul_scl_ipt is not None:
        out["mul_scl_ipt"] = "" if args.mul_scl_ipt == "none" else args.mul_scl_ipt
    if args.num_heads:
        out["num_heads"] = tuple(int(v) for v in args.num_heads.split(","))
    if args.resolution:
        h, _, w = args.resolution.partition("x")
        out["resolution"] = (int(h), int(w or h))
    return out


def _add_arch_flags(p):
    g = p.add_argument_group("architecture overrides (what the weights cannot tell)")
    g.add_argument("--mul-scl-ipt", choices=["none", "add", "cat"], default=None,
                   help="multi-scale input; 'add' and none leave identical weights (default: none unless 'cat')")
    g.add_argument("--num-heads", default=None, help="PVT v2 heads per stage, e.g. 1,2,5,8 (non-preset widths)")
    g.add_argument("--resolution", default=None, help="training resolution HxW recorded in the config, e.g. 2048x2048")


def cmd_convert(args) -> int:
    from birefnet_jax.api import load
    from birefnet_jax.checkpoint import save_model
    from birefnet_jax.config import backbone_name
    from birefnet_jax.convert import model_to_state_dict, write_safetensors

    model = load(args.src, **_overrides(args))
    cfg = model.cfg
    name = backbone_name(cfg.backbone) or f"custom {cfg.backbone.kind}"
    print(f"architecture: {name}, mul_scl_ipt={cfg.mul_scl_ipt!r}, cxt_num={cfg.cxt_num}, "
          f"squeeze={cfg.squeeze_block!r}, dec_blk={cfg.dec_blk}, dec_att={cfg.dec_att!r}, "
          f"batch_norm={cfg.batch_norm}")
    dst = Path(args.dst)
    if dst.suffix == ".safetensors":
        if dst.exists() and not args.force:
            print(f"error: {dst} exists (use --force)", file=sys.stderr)
            return 2
        write_safetensors(model_to_state_dict(model), dst)
    else:
        save_model(model, dst, overwrite=args.force, extra={"source": str(Path(args.src).name)})
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="birefnet-jax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("convert", help="original .pth/.safetensors -> Orbax checkpoint (or back to .safetensors)")
    p.add_argument("src", help=".pth, .safetensors or an Orbax checkpoint directory")
    p.add_argument("dst", help="Orbax checkpoint directory, or a .safetensors path for a PyTorch-layout export")
    p.add_argument("--force", action="store_true", help="overwrite dst")
    _add_arch_flags(p)
    p.set_defaults(func=cmd_convert)
    p = sub.add_parser("verify", help="compare a checkpoint's logits with the original's (reference .npz)")
    p.add_argument("checkpoint")
    p.add_argument("reference", help=".npz with input<i> (NCHW, normalised) and output<i> (NCHW logits)")
    p.add_argument("--tolerance", type=float, default=1e-4, help="max relative L2 error (default 1e-4)")
    _add_arch_flags(p)
    p.set_defaults(func=cmd_verify)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
