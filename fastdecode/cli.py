"""The ``fastdecode`` command: ``fastdecode info`` and ``fastdecode demo``."""

from __future__ import annotations

import argparse
import json


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastdecode", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    show = sub.add_parser("info", help="versions, build and the backends of every op")
    show.add_argument("--json", action="store_true", help="print the dict as JSON")
    sub.add_parser("demo", help="run the decode-time primitives on a worked example")
    args = parser.parse_args(argv)

    if args.command == "info":
        from fastdecode._info import format_info, info

        facts = info()
        print(json.dumps(facts, indent=2) if args.json else format_info(facts))
    else:
        from fastdecode.demo import run_demo

        run_demo()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
