"""Ray Serve: N engine replicas behind one ingress that serves the same API as `hotpeft serve`.

    hotpeft serve --ray --replicas 2 [--ray-address ADDR] [--registry-url postgresql+psycopg://...]

or, with the settings in HOTPEFT_* variables, `serve run hotpeft.server.ray_serve:app`.

The ingress deployment runs hotpeft's FastAPI app, every route unchanged, on a Runtime whose
engine is a `RayEngine`: a generation request goes to an `EngineReplica` through a deployment
handle with `multiplexed_model_id` = the adapter version (`name@N`), so Ray Serve routes it
preferably to a replica that already holds that adapter; base requests go to any replica. Each
replica has its own model, engine and residency tiers and watches the shared registry, so an
adapter registered through any process is served everywhere within one poll.

Work in progress (issue 8): weighted mixes, load/unload and per-replica metrics through the
ingress are not wired yet.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import signal
import socket
import threading
from collections.abc import AsyncIterator

from ray import serve

from hotpeft.server.config import Settings
from hotpeft.server.engine.base import (
    Engine, EngineFailure, EventSink, GenerationRequest, Overloaded, ReplicaUnavailable, SamplingParams,
    TokenEvent,
)

log = logging.getLogger("hotpeft.ray")

SETTINGS_ENV = "HOTPEFT_RAY_SETTINGS"  # the settings as JSON, handed to every replica's process
APP_NAME = "hotpeft"
REPLICA = "EngineReplica"
BASE_ID = ""  # the multiplexed id of base-only requests: no adapter to prefer a replica for


def settings_json(settings: Settings, *, keys: bool) -> str:
    """The settings for a replica's process; the keys only for the ingress (engine replicas take no HTTP)."""
    data = settings.model_dump(mode="json", exclude={"api_key", "admin_key", "ray", "replicas", "ray_address"})
    if keys:
        data["api_key"] = [k.get_secret_value() for k in settings.api_key]
        data["admin_key"] = [k.get_secret_value() for k in settings.admin_key]
    return json.dumps(data)


def _settings_from_env() -> Settings:
    raw = os.environ.get(SETTINGS_ENV)
    return Settings(**json.loads(raw)) if raw else Settings()


class EngineReplica:
    """One model, one engine, its own tiers. Methods are called through a deployment handle."""

    def __init__(self) -> None:
        from hotpeft.server.runtime import build_runtime

        settings = _settings_from_env()
        self.rt = build_runtime(settings)
        engine, catalog = self.rt.engine, self.rt.catalog
        engine.start()
        catalog.on_removed.append(lambda keys: engine.call(lambda: engine.release(keys)))
        catalog.watch()
        self.replica = serve.get_replica_context().replica_id.unique_id
        log.info("replica %s serving %s", self.replica, self.rt.base.model_id)

    @serve.multiplexed(max_num_models_per_replica=64)
    async def adapter(self, key: str):
        """The adapter version in the CPU tier and, for a LoRA, resident in the engine."""
        from hotpeft.adapters.errors import AdapterNotFound

        try:
            record = self.rt.catalog.resolve(key).record
        except AdapterNotFound:  # the ingress saw a version this replica's poll has not seen yet
            await asyncio.to_thread(self.rt.catalog.refresh)
            record = self.rt.catalog.resolve(key).record
        if record is None:
            return None
        version = await asyncio.to_thread(self.rt.catalog.load, record)
        if version.kind == "lora":
            engine = self.rt.engine
            await asyncio.wrap_future(engine.call(lambda: engine.make_resident(version)))
        return version

    async def generate(self, payload: dict) -> AsyncIterator[dict]:
        key = serve.get_multiplexed_model_id()
        adapter = await self.adapter(key) if key else None
        request = GenerationRequest(payload["prompt_ids"], SamplingParams(**payload["params"]), adapter)
        engine = self.rt.engine
        sink = EventSink(asyncio.get_running_loop())
        engine.submit(request, sink)  # Overloaded here goes back to the ingress as itself
        yield [{"replica": self.replica}]
        finished = False
        try:
            while not finished:
                # Everything that is already there in one message: under load a message carries
                # several tokens instead of one Ray object per token.
                events = [await sink.queue.get()]
                while not sink.queue.empty():
                    events.append(sink.queue.get_nowait())
                out = []
                for ev in events:
                    if ev.error is not None:
                        finished = True
                        raise ev.error
                    out.append({"text": ev.text, "token_ids": ev.token_ids, "finish_reason": ev.finish_reason,
                                "prompt_tokens": ev.prompt_tokens, "completion_tokens": ev.completion_tokens})
                    if ev.finish_reason is not None:
                        finished = True
                        break
                yield out
        finally:
            if not finished:
                engine.cancel(request.request_id)

    def stats(self) -> dict:
        return {"replica": self.replica, **self.rt.engine.stats(), "resident": sorted(self.rt.engine.resident)}


class _NoBank:
    pinned: frozenset = frozenset()


class RayEngine(Engine):
    """The ingress's engine: every request goes to a replica; the HTTP layer sees no difference."""

    def __init__(self, handle, limits) -> None:
        self.handle = handle
        self.limits = limits
        self.bank = _NoBank()
        self.resident: frozenset[str] = frozenset()
        self.adapter_counts = {"hits": 0, "misses": 0, "loads": 0, "evictions": 0, "load_failures": 0}
        self.observer = None
        self._open: dict[int, object] = {}
        self._ids = itertools.count()

    def start(self) -> None:
        pass

    def stop(self) -> None:
        for response in list(self._open.values()):
            response.cancel()

    def submit(self, request, sink) -> None:  # pragma: no cover - generate() is the path used
        raise NotImplementedError("RayEngine streams through generate()")

    def cancel(self, request_id: int) -> None:
        response = self._open.pop(request_id, None)
        if response is not None:
            response.cancel()

    def call(self, fn):
        raise EngineFailure("load and unload act on one replica's engine; through Ray each replica keeps its own "
                            "residency (adapters load on their first request)")

    def stats(self) -> dict:
        return {"running": len(self._open), "waiting": 0, "slots": 0, "slot_len": 0, "kv_tokens": 0, "kv_bytes": 0,
                "steps": 0, "tokens": 0, "failed_steps": 0, "resident_loras": 0, "resident_lora_bytes": 0,
                "alive": True, "stalled_s": 0.0}

    def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        if request.adapter is not None and request.adapter.key.startswith("mix:"):
            raise EngineFailure("weighted adapter mixes are not served through Ray yet; register the merge "
                                "(POST /v1/adapters/merge) and call it by name")
        key = BASE_ID if request.adapter is None else request.adapter.key
        p = request.params
        payload = {"prompt_ids": request.prompt_ids,
                   "params": {"max_tokens": p.max_tokens, "temperature": p.temperature, "top_p": p.top_p,
                              "seed": p.seed, "stop": list(p.stop), "ignore_eos": p.ignore_eos}}
        response = self.handle.options(multiplexed_model_id=key, stream=True).generate.remote(payload)
        self._open[request.request_id] = response
        return self._events(request.request_id, response)

    async def _events(self, request_id: int, response) -> AsyncIterator[TokenEvent]:
        from ray.exceptions import RayError, RayTaskError
        from ray.serve.exceptions import BackPressureError, RayServeException

        try:
            replica = None
            async for batch in response:
                for item in batch:
                    if "replica" in item:
                        replica = item["replica"]
                        continue
                    yield TokenEvent(item["text"], item["token_ids"], item["finish_reason"], item["prompt_tokens"],
                                     item["completion_tokens"], replica=replica)
        except RayTaskError as e:  # raised inside the replica: its own error (an instance of the cause too)
            cause = e.as_instanceof_cause()
            raise (cause if isinstance(cause, Exception) and not isinstance(cause, RayTaskError) else
                   EngineFailure(f"generation failed on replica {replica}: {e.cause!r}")) from e
        except BackPressureError as e:
            raise Overloaded(f"every engine replica is at capacity: {e}; retry shortly", retry_after=1) from e
        except (RayError, RayServeException) as e:  # the replica died, or none is up yet
            where = f"the engine replica {replica} running this request went away" if replica else \
                "no engine replica could take this request"
            raise ReplicaUnavailable(f"{where} ({type(e).__name__}); retry: Ray Serve sends new requests to the "
                                     "remaining replicas and restarts lost ones") from e
        finally:
            if self._open.pop(request_id, None) is not None:
                response.cancel()


def build_ingress_app():
    """The FastAPI app of the ingress replica (called by Ray Serve in that replica's process)."""
    from hotpeft.server.app import create_app
    from hotpeft.server.engine.batching import EngineLimits
    from hotpeft.server.runtime import build_runtime

    settings = _settings_from_env()
    handle = serve.get_deployment_handle(REPLICA, APP_NAME)

    def runtime(s: Settings):
        limits = EngineLimits(max_queue=s.max_queue, max_resident_adapter_bytes=s.max_resident_adapter_bytes)
        return build_runtime(s, engine=RayEngine(handle, limits))

    return create_app(settings, runtime_builder=runtime)


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
    import ray

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
    """For `serve run hotpeft.server.ray_serve:app`: settings from HOTPEFT_* (and `args`, flag names as keys)."""
    return deployments(Settings(**(args or {})))
