"""Ray Serve: N engine replicas behind one ingress that serves the same API as `hotpeft serve`.

    hotpeft serve --ray --replicas 2 [--ray-address ADDR] [--registry-url postgresql+psycopg://...]

or, with the settings in HOTPEFT_* variables, `serve run hotpeft.server.ray.deploy:app`.

The ingress deployment runs hotpeft's FastAPI app, every route unchanged, on a Runtime whose
engine is a `RayEngine` (engine.py): a generation request goes to an `EngineReplica`
(replica.py) through a deployment handle with `multiplexed_model_id` = the adapter version
(`name@N`), so Ray Serve routes it preferably to a replica that already holds that adapter; base
requests go to any replica. Each replica has its own model, engine and residency tiers and
watches the shared registry, so an adapter registered through any process is served everywhere
within one poll. What the ingress needs from every replica goes through the board (board.py).
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import threading

import ray
from ray import serve

from hotpeft.server.app import create_app
from hotpeft.server.config import Settings
from hotpeft.server.ray.board import INGRESS as INGRESS_ROLE, BoardView, Poster, board
from hotpeft.server.ray.engine import RayEngine
from hotpeft.server.ray.replica import EngineReplica
from hotpeft.server.ray.settings import APP_NAME, REPLICA, SETTINGS_ENV, settings_from_env, settings_json
from hotpeft.server.runtime import build_runtime

log = logging.getLogger("hotpeft.ray")


def build_ingress_app():
    """The FastAPI app of an ingress replica (called by Ray Serve in that replica's process)."""
    settings = settings_from_env()
    handle = serve.get_deployment_handle(REPLICA, APP_NAME)
    me = _replica_id()

    def runtime(s: Settings):
        view = BoardView(APP_NAME)
        rt = build_runtime(s, engine=RayEngine(handle, view, s.replicas))

        # /metrics: this ingress's own families fresh, the other processes' as last posted.
        rt.metrics.labels = {"ingress": me}
        rt.metrics.remote = lambda: [({role: source}, families)
                                     for source, (role, _, families) in view.parts.items() if source != me]
        Poster(APP_NAME, me, INGRESS_ROLE, lambda: ({}, rt.metrics.own_families())).start()
        return rt

    return create_app(settings, runtime_builder=runtime)


def _replica_id() -> str:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 - outside a replica (tests): the process id tells processes apart
        return f"pid{os.getpid()}"


def deployments(settings: Settings):
    """The application: the ingress bound to N engine replicas."""
    # Serve's default of 5 requests at once per replica would starve the continuous batch: a replica
    # takes what its engine can run or queue, the ingress what all of them can.
    per_replica = settings.max_num_seqs + settings.max_queue
    replica = serve.deployment(
        EngineReplica, name=REPLICA, num_replicas=settings.replicas, max_ongoing_requests=per_replica,
        ray_actor_options={"num_cpus": 0,
                           "runtime_env": {"env_vars": {SETTINGS_ENV: settings_json(settings, keys=False)}}})

    @serve.deployment(name="Ingress", max_ongoing_requests=per_replica * settings.replicas, ray_actor_options={
        "num_cpus": 0, "runtime_env": {"env_vars": {SETTINGS_ENV: settings_json(settings, keys=True)}}})
    @serve.ingress(build_ingress_app)
    class Ingress:
        def __init__(self, replicas) -> None:
            self.replicas = replicas  # bound so that Serve deploys them with the app

    return Ingress.bind(replica.bind())


def run(settings: Settings) -> int:
    """`hotpeft serve --ray`: connect to (or start) a Ray cluster, deploy, serve until interrupted."""
    problem = unreachable(settings.ray_address)
    if problem:
        log.error("%s", problem)
        return 3
    try:
        ray.init(address=settings.ray_address, include_dashboard=False, log_to_driver=False,
                 ignore_reinit_error=True)
    except (ConnectionError, RuntimeError, ValueError) as e:
        log.error("cannot join the Ray cluster at %s: %s", settings.ray_address, e)
        return 3
    def stop(signum, frame):  # SIGTERM: leave through the `finally`, which takes the cluster down with us
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    serve.start(http_options={"host": settings.host, "port": settings.port})
    serve.run(deployments(settings), name=APP_NAME, route_prefix="/", blocking=False)
    log.info("serving through Ray Serve on %s:%d with %d replica(s)", settings.host, settings.port, settings.replicas)
    try:
        asyncio.run(_forever())
    except KeyboardInterrupt:
        pass
    finally:
        # Serve's shutdown waits on its controller, which can hang after replicas were killed: bound it.
        closer = threading.Thread(target=serve.shutdown, daemon=True)
        closer.start()
        closer.join(settings.drain_timeout + 10)
        try:  # the board is detached (it outlives replicas): take it down with the app
            ray.kill(board(APP_NAME), no_restart=True)
        except Exception:  # noqa: BLE001 - the cluster is going down anyway
            pass
        ray.shutdown()
    return 0


def unreachable(address: str | None, timeout: float = 5.0) -> str | None:
    """Why `--ray-address` cannot be joined, found in seconds; None when its port answers (or none is given).

    ray.init itself retries an address that does not answer for minutes before it gives up."""
    if address in (None, "", "auto", "local"):
        return None
    target = address.removeprefix("ray://").removeprefix("http://")
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        return f"--ray-address {address!r} is not host:port (or ray://host:port, auto, local)"
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return None
    except OSError as e:
        return f"cannot reach the Ray cluster at --ray-address {address}: {e.strerror or e}; start it (ray start " \
               "--head) or leave --ray-address out to start a local one"


async def _forever() -> None:
    while True:
        await asyncio.sleep(3600)


def app(args: dict | None = None):
    """For `serve run hotpeft.server.ray.deploy:app`: settings from HOTPEFT_* (and `args`, flag names as keys)."""
    return deployments(Settings(**(args or {})))
