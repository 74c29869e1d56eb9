"""The ``lifelong-engine`` command."""

from __future__ import annotations

import argparse
import platform
import sys


def _info(args: argparse.Namespace) -> int:
    import torch

    import lifelong_engine
    from lifelong_engine import backends

    print(f"lifelong-engine {lifelong_engine.__version__}")
    print(f"python {platform.python_version()}, torch {torch.__version__}")
    cuda = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    print(f"CUDA device: {cuda}")
    print(f"backends available: {', '.join(backends.available_backends())}")
    print(f"backend requested: {backends.requested_backend()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lifelong-engine", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, devices and op backends of this installation").set_defaults(func=_info)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
