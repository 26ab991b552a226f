"""``python -m fastdiff {info,demo}``."""

import argparse
import sys


def _batch(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {value}")
    return n


def _device(parser: argparse.ArgumentParser, name: str | None):
    """The torch device the demo runs on, or a usage error saying why it cannot (no traceback)."""
    import torch

    if name is None:
        return None
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        parser.error(f"--device: {exc}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device: {name} was asked for, but this torch ({torch.__version__}) sees no CUDA device")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        parser.error(f"--device: {name} does not exist ({torch.cuda.device_count()} CUDA devices)")
    if dev.type not in ("cpu", "cuda"):
        parser.error(f"--device: expected cpu or cuda[:i], got {name}")
    return str(dev)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastdiff", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, available backends and why not, CUDA archs, GPU")
    demo = sub.add_parser("demo", help="sample the built-in Gaussian-mixture oracle with DDIM, vs diffusers")
    demo.add_argument("--out", default="demo_out", help="folder for the PNG (default: demo_out)")
    demo.add_argument("--batch", type=_batch, default=256, help="samples per run, >= 1 (default: 256)")
    demo.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda if available, else cpu)")
    args = parser.parse_args(argv)
    if args.command == "info":
        from fastdiff.info import report

        print(report())
        return 0
    from fastdiff.demo import run

    return run(out=args.out, batch=args.batch, device=_device(demo, args.device))


if __name__ == "__main__":
    sys.exit(main())
