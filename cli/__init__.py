"""The `hotpeft` command: one module per family of subcommands.

    serve.py     hotpeft serve
    adapters.py  hotpeft adapters ...        (an HTTP client of a running server)
    train.py     hotpeft train | eval | demo-data
    tools.py     hotpeft bench | loadtest

This package is the one place that may import every room of hotpeft. Its modules import what a
subcommand needs only when that subcommand runs, so `hotpeft --help` and the HTTP clients start
without loading torch.
"""
from __future__ import annotations

import argparse
import sys

from hotpeft.cli import adapters, serve, tools, train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hotpeft", description="hotpeft: one resident base model, many PEFT adapters.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve.add_parser(sub)
    adapters.add_parser(sub)
    tools.add_parsers(sub)
    train.add_parsers(sub)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    commands = {"serve": serve.serve, "bench": tools.bench_main, "loadtest": tools.loadtest_main,
                "adapters": adapters.main, "train": train.train_main, "eval": train.eval_main,
                "demo-data": train.demo_main}
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
