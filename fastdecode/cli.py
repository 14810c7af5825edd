"""The ``fastdecode`` command: ``fastdecode info`` and ``fastdecode demo``."""

from __future__ import annotations

import argparse
import json


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastdecode", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    show = sub.add_parser("info", help="versions, build and the backends of every op")
    show.add_argument("--json", action="store_true", help="print the dict as JSON")
    demo = sub.add_parser("demo", help="decode the built-in prompts with the default model, "
                          "greedy and with lookahead (config='auto'), and compare")
    demo.add_argument("--primitives", action="store_true",
                      help="instead, run the decode-time primitives on a worked example (no model)")
    demo.add_argument("--device", choices=("cpu", "cuda"),
                      help="where the model runs (default: cuda when available)")
    demo.add_argument("--threads", type=int, help="torch CPU threads (default: 1 on the CPU)")
    demo.add_argument("--max-new-tokens", type=int,
                      help="one budget for every prompt (default: per category)")
    args = parser.parse_args(argv)

    if args.command == "info":
        from fastdecode._info import format_info, info

        facts = info()
        print(json.dumps(facts, indent=2) if args.json else format_info(facts))
    elif args.primitives:
        from fastdecode.demo import run_primitives

        run_primitives()
    else:
        from fastdecode.demo import run_demo

        for name in ("threads", "max_new_tokens"):
            value = getattr(args, name)
            if value is not None and value < 1:
                demo.error(f"--{name.replace('_', '-')} must be at least 1, found {value}")
        if args.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                demo.error("--device cuda: no CUDA device is available")
        run_demo(device=args.device, threads=args.threads, max_new_tokens=args.max_new_tokens)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
