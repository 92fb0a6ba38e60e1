"""The `hotpeft` command. `hotpeft --help` lists the subcommands; each flag is also HOTPEFT_<NAME>."""
from __future__ import annotations

import argparse
import logging
import sys
import typing

from pydantic import ValidationError


def _serve_parser(sub) -> None:
    from hotpeft.server.config import Settings

    p = sub.add_parser("serve", help="start the OpenAI-compatible server on the base model and its adapters",
                       description="Start the server. Every flag can also be set as HOTPEFT_<FLAG> "
                                   "(e.g. HOTPEFT_QUANTIZE=nf4); flags win over the environment.")
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        env = "HOTPEFT_" + name.upper()
        default = field.get_default(call_default_factory=True)
        help_text = f"{field.description} (env {env}; default {default})".replace("%", "%%")
        if field.annotation is bool:
            p.add_argument(flag, dest=name, action="store_const", const=True, default=None, help=help_text)
        elif typing.get_origin(field.annotation) is list:
            p.add_argument(flag, dest=name, action="append", default=None, metavar=name.upper(), help=help_text)
        else:
            p.add_argument(flag, dest=name, default=None, metavar=name.upper(), help=help_text)


def _settings_from(args: argparse.Namespace):
    from hotpeft.server.config import Settings

    given = {k: v for k, v in vars(args).items() if k not in ("command",) and v is not None}
    return Settings(**given)


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from hotpeft.server.app import create_app

    try:
        settings = _settings_from(args)
    except ValidationError as e:
        for err in e.errors():
            flag = "--" + "-".join(str(p) for p in err["loc"]).replace("_", "-")
            print(f"hotpeft serve: {flag}: {err['msg'].removeprefix('Value error, ')}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level)
    server = uvicorn.Server(config)
    server.run()
    # uvicorn logs a failed start-up (model or adapter errors) and returns; report it as a failed start.
    return 0 if server.started else 3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hotpeft", description="hotpeft: one resident base model, many PEFT adapters.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _serve_parser(sub)
    from hotpeft.server import adapters_cli, bench
    from hotpeft.trainer import cli as trainer_cli

    adapters_cli.add_parser(sub)
    bench.add_parser(sub)
    trainer_cli.add_parsers(sub)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    commands = {"serve": serve, "bench": bench.main, "adapters": adapters_cli.main, "train": trainer_cli.train_main,
                "eval": trainer_cli.eval_main, "demo-data": trainer_cli.demo_main}
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
