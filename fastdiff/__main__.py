"""``python -m fastdiff {info,demo}``."""

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastdiff", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, available backends and why not, CUDA archs, GPU")
    demo = sub.add_parser("demo", help="sample the built-in Gaussian-mixture oracle with DDIM, vs diffusers")
    demo.add_argument("--out", default="demo_out", help="folder for the PNG (default: demo_out)")
    demo.add_argument("--batch", type=int, default=256, help="samples per run (default: 256)")
    demo.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    args = parser.parse_args(argv)
    if args.command == "info":
        from fastdiff.info import report

        print(report())
        return 0
    from fastdiff.demo import run

    return run(out=args.out, batch=args.batch, device=args.device)


if __name__ == "__main__":
    sys.exit(main())
