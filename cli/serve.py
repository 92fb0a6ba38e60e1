"""`hotpeft serve`: the OpenAI-compatible server (or, with --ray, the Ray Serve application).

Every flag is a field of `hotpeft.server.config.Settings`, and also HOTPEFT_<FLAG>.
"""
from __future__ import annotations

import argparse
import logging
import sys
import typing


def add_parser(sub) -> None:
    from hotpeft.server.config import Settings  # the server's modules: only for `serve`, not every command

    p = sub.add_parser("serve", help="start the OpenAI-compatible server on the base model and its adapters",
                       description="Start the server. Every flag can also be set as HOTPEFT_<FLAG> "
                                   "(e.g. HOTPEFT_QUANTIZE=nf4); flags win over the environment.")
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        env = "HOTPEFT_" + name.upper()
        default = field.get_default(call_default_factory=True)
        help_text = f"{field.description} (env {env}; default {default})".replace("%", "%%")
        if field.annotation is bool:
            p.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif typing.get_origin(field.annotation) is list:
            p.add_argument(flag, dest=name, action="append", default=None, metavar=name.upper(), help=help_text)
        else:
            p.add_argument(flag, dest=name, default=None, metavar=name.upper(), help=help_text)


def _settings_from(args: argparse.Namespace):
    from hotpeft.server.config import Settings  # the server's modules: only for `serve`, not every command

    given = {k: v for k, v in vars(args).items() if k not in ("command",) and v is not None}
    return Settings(**given)


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from hotpeft.server.app import create_app  # the server's modules: only for `serve`, not every command

    from pydantic import ValidationError  # pydantic: only when the server starts

    try:
        settings = _settings_from(args)
    except ValidationError as e:
        for err in e.errors():  # the message only: the input may be a key
            flag = "--" + "-".join(str(p) for p in err["loc"][:1]).replace("_", "-")
            where = f"{flag}: " if err["loc"] else ""
            print(f"hotpeft serve: {where}{err['msg'].removeprefix('Value error, ')}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if settings.ray:
        try:
            from hotpeft.server.ray import deploy  # ray: an optional extra, heavy to import
        except ImportError:
            print("hotpeft serve: --ray needs Ray Serve: pip install 'hotpeft[ray]'", file=sys.stderr)
            return 2
        return deploy.run(settings)
    app = create_app(settings)
    # The drain ends the responses it waited for (or aborts them at --drain-timeout) before uvicorn
    # begins its own shutdown; the grace here only bounds writing their last bytes.
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            timeout_graceful_shutdown=10)
    server = _draining_server(config, app, settings.drain_timeout)
    server.run()
    # uvicorn logs a failed start-up (model or adapter errors) and returns; report it as a failed start.
    return 0 if server.started else 3


def _draining_server(config, app, drain_timeout: float):
    import signal
    import time

    import uvicorn

    log = logging.getLogger("hotpeft.server")

    class DrainingServer(uvicorn.Server):
        """SIGTERM drains: /ready and every new request answer 503 at once, requests already running get
        --drain-timeout seconds to finish (then they are ended with a 503 error), and the process exits 0.
        A second SIGTERM, or SIGINT (Ctrl+C), stops without waiting."""

        def handle_exit(self, sig, frame) -> None:
            lifecycle = app.state.lifecycle
            if sig == signal.SIGTERM and not lifecycle.draining:
                lifecycle.begin_drain()
                log.info("SIGTERM: draining %d request(s), up to %.0f s (--drain-timeout)", lifecycle.in_flight,
                         drain_timeout)
                return
            super().handle_exit(sig, frame)

        async def on_tick(self, counter: int) -> bool:
            lifecycle = app.state.lifecycle
            if lifecycle.draining and not self.should_exit:
                if lifecycle.in_flight == 0:
                    log.info("drained in %.1f s", time.monotonic() - lifecycle.drain_started)
                    self.should_exit = True
                elif time.monotonic() - lifecycle.drain_started > drain_timeout:
                    log.warning("--drain-timeout %.0f s reached: ending %d request(s) still running", drain_timeout,
                                lifecycle.in_flight)
                    runtime = getattr(app.state, "runtime", None)
                    if runtime is not None:
                        runtime.engine.abort_all(f"the server is shutting down: --drain-timeout {drain_timeout:g} s "
                                                 "elapsed before this request finished")
                    self.should_exit = True
            return await super().on_tick(counter)

    return DrainingServer(config)
