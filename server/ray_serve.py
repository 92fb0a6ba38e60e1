"""Ray Serve: N engine replicas behind one ingress that serves the same API as `hotpeft serve`.

    hotpeft serve --ray --replicas 2 [--ray-address ADDR] [--registry-url postgresql+psycopg://...]

or, with the settings in HOTPEFT_* variables, `serve run hotpeft.server.ray_serve:app`.

The ingress deployment runs hotpeft's FastAPI app, every route unchanged, on a Runtime whose
engine is a `RayEngine`: a generation request goes to an `EngineReplica` through a deployment
handle with `multiplexed_model_id` = the adapter version (`name@N`), so Ray Serve routes it
preferably to a replica that already holds that adapter; base requests go to any replica. Each
replica has its own model, engine and residency tiers and watches the shared registry, so an
adapter registered through any process is served everywhere within one poll.

What the ingress needs from every replica (stats, residency, metrics; load and unload on all of
them) goes through a board actor, server/ray_board.py.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator

from ray import serve

from hotpeft.server.config import Settings
from hotpeft.server.ray_board import INGRESS as INGRESS_ROLE, REPLICA as REPLICA_ROLE, BoardView, Poster, board
from hotpeft.server.engine.base import (
    Engine, EngineFailure, EventSink, GenerationRequest, Overloaded, ReplicaUnavailable, SamplingParams,
    TokenEvent,
)

log = logging.getLogger("hotpeft.ray")

SETTINGS_ENV = "HOTPEFT_RAY_SETTINGS"  # the settings as JSON, handed to every replica's process
APP_NAME = "hotpeft"
REPLICA = "EngineReplica"
BASE_ID = ""  # the multiplexed id of base-only requests: no adapter to prefer a replica for
MAX_RECIPES = 256  # mix recipes a replica remembers (a mix is rebuilt from its recipe when asked again)


def settings_json(settings: Settings, *, keys: bool) -> str:
    """The settings for a replica's process. The keys and `--adapters-dir` only for the ingress:
    engine replicas take no HTTP, and one process registering the folders is enough (several
    registering the same folder at once could each add a version)."""
    data = settings.model_dump(mode="json", exclude={"api_key", "admin_key", "ray", "ray_address"})
    if not keys:
        data["adapters_dir"] = None
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
        self.rt = build_runtime(settings, report_jobs=False)  # the ingress reports the jobs
        engine, catalog = self.rt.engine, self.rt.catalog
        engine.start()
        catalog.on_removed.append(engine.forget)
        catalog.watch()
        self.replica = serve.get_replica_context().replica_id.unique_id
        self._recipes: OrderedDict[str, tuple] = OrderedDict()  # mix key -> recipe, for `adapter`
        self.poster = Poster(APP_NAME, self.replica, REPLICA_ROLE, self._state, self._execute)
        self.poster.start()
        log.info("replica %s serving %s", self.replica, self.rt.base.model_id)

    @serve.multiplexed(max_num_models_per_replica=64)
    async def adapter(self, key: str) -> str:
        """Serve's routing table: the adapter versions this replica holds. Loads the version into
        the CPU tier and, for a LoRA, into the engine; the weights stay in those tiers (their LRU
        decides), Serve's cache holds only the key."""
        version = await self._version(key)
        if version.kind == "lora":
            await self.rt.engine.load(version)
        return key

    async def _version(self, key: str):
        from hotpeft.adapters.errors import AdapterNotFound

        catalog = self.rt.catalog
        if key.startswith("mix:"):
            sources, strategy, density = self._recipes[key]
            return await asyncio.to_thread(catalog.mix, list(sources), strategy, density=density)
        try:
            record = catalog.resolve(key).record
        except AdapterNotFound:  # the ingress saw a version this replica's poll has not seen yet
            await asyncio.to_thread(catalog.refresh)
            record = catalog.resolve(key).record
        return await asyncio.to_thread(catalog.load, record)

    async def generate(self, payload: dict) -> AsyncIterator[list[dict]]:
        key = serve.get_multiplexed_model_id()
        adapter = None
        if key:
            if payload.get("recipe"):
                self._recipes[key] = payload["recipe"]
                self._recipes.move_to_end(key)
                while len(self._recipes) > MAX_RECIPES:
                    self._recipes.popitem(last=False)
            await self.adapter(key)
            adapter = await self._version(key)
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

    def _state(self) -> tuple[dict, list]:
        """What this replica posts to the board every second."""
        engine, catalog = self.rt.engine, self.rt.catalog
        stats = engine.stats()
        stats.update(generation=catalog.snapshot.generation, registry_problem=catalog.registry_problem,
                     resident=sorted(engine.resident), pinned=sorted(engine.bank.pinned.copy()),
                     cpu=sorted(catalog.cache.keys()))
        return stats, [f for f in self.rt.metrics.registry.collect() if f.samples]

    def _execute(self, command: dict) -> dict:
        """A board command (from the poster's thread): load / unload on this replica, as the
        routes do on a single server."""
        from hotpeft.server.runtime import hold, let_go

        if command["op"] == "load":
            async def load() -> bool:
                return await hold(self.rt, await self._version(command["key"]), command["pin"])

            return {"changed": asyncio.run(load())}
        if command["op"] == "unload":
            return {"unloaded": sorted(asyncio.run(let_go(self.rt, set(command["keys"]))))}
        raise ValueError(f"unknown board command {command['op']!r}")


class _Pins:
    """`engine.bank.pinned` of the ingress: what any engine replica has pinned."""

    def __init__(self, view: BoardView):
        self.view = view

    @property
    def pinned(self) -> frozenset[str]:
        return frozenset(k for stats in self.view.replicas().values() for k in stats.get("pinned", ()))


SUMMED = ("running", "waiting", "slots", "kv_tokens", "kv_bytes", "steps", "tokens", "failed_steps", "resident_loras",
          "resident_lora_bytes")


class RayEngine(Engine):
    """The ingress's engine: every request goes to a replica; the HTTP layer sees no difference.

    Stats, residency and pins are the engine replicas' own, as last posted on the board (at most
    about a second old); load and unload run on every engine replica up at that moment."""

    def __init__(self, handle, limits, view: BoardView, target: int) -> None:
        self.handle = handle
        self.limits = limits
        self.view = view
        self.target = target
        self.bank = _Pins(view)
        self.adapter_counts = {"hits": 0, "misses": 0, "loads": 0, "evictions": 0, "load_failures": 0}
        self.observer = None
        self._open: dict[int, object] = {}

    @property
    def resident(self) -> frozenset[str]:
        return frozenset(k for stats in self.view.replicas().values() for k in stats.get("resident", ()))

    def placement(self, key: str) -> dict[str, str]:
        return {replica: "device" if key in stats.get("resident", ()) else "cpu" if key in stats.get("cpu", ()) else
                "disk" for replica, stats in sorted(self.view.replicas().items())}

    def start(self) -> None:
        self.view.start()

    def stop(self) -> None:
        self.view.stop()
        for response in list(self._open.values()):
            response.cancel()

    def submit(self, request, sink) -> None:  # pragma: no cover - generate() is the path used
        raise NotImplementedError("RayEngine streams through generate()")

    def cancel(self, request_id: int) -> None:
        response = self._open.pop(request_id, None)
        if response is not None:
            response.cancel()

    def stats(self) -> dict:
        replicas = self.view.replicas()
        out = {k: sum(r.get(k, 0) for r in replicas.values()) for k in SUMMED}
        out["slot_len"] = max((r.get("slot_len", 0) for r in replicas.values()), default=0)
        out["alive"] = any(r.get("alive") for r in replicas.values())
        out["stalled_s"] = max((r.get("stalled_s", 0.0) for r in replicas.values()), default=0.0)
        out["replicas"] = {"up": len(replicas), "target": self.target, "ids": sorted(replicas),
                           "registry_generation": {rid: r.get("generation") for rid, r in sorted(replicas.items())},
                           "resident": {rid: r.get("resident", []) for rid, r in sorted(replicas.items())}}
        out["in_flight"] = len(self._open)
        return out

    async def _everywhere(self, command: dict) -> dict[str, dict]:
        if not self.view.replicas():
            raise ReplicaUnavailable("no engine replica is up to run this; retry when /ready says ready")
        answers = await asyncio.to_thread(self.view.command, command, 120.0)
        for replica, answer in sorted(answers.items()):
            if isinstance(answer, Exception):
                raise answer
        return answers

    async def load(self, version, pin: bool = False) -> bool:
        if version.kind != "lora":
            return False
        answers = await self._everywhere({"op": "load", "key": version.key, "pin": pin})
        return any(a["changed"] for a in answers.values())

    async def unload(self, keys: set[str]) -> set[str]:
        answers = await self._everywhere({"op": "unload", "keys": sorted(keys)})
        return {k for a in answers.values() for k in a["unloaded"]}

    def forget(self, keys: set[str]) -> None:
        pass  # every engine replica watches the registry and forgets deleted versions itself

    def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        key = BASE_ID if request.adapter is None else request.adapter.key
        p = request.params
        payload = {"prompt_ids": request.prompt_ids,
                   "params": {"max_tokens": p.max_tokens, "temperature": p.temperature, "top_p": p.top_p,
                              "seed": p.seed, "stop": list(p.stop), "ignore_eos": p.ignore_eos}}
        if request.adapter is not None and request.adapter.recipe is not None:
            payload["recipe"] = request.adapter.recipe  # a mix: the replica builds it from the same versions
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
    """The FastAPI app of an ingress replica (called by Ray Serve in that replica's process)."""
    from hotpeft.server.app import create_app
    from hotpeft.server.engine.batching import EngineLimits
    from hotpeft.server.runtime import build_runtime

    settings = _settings_from_env()
    handle = serve.get_deployment_handle(REPLICA, APP_NAME)
    me = _replica_id()

    def runtime(s: Settings):
        limits = EngineLimits(max_queue=s.max_queue, max_resident_adapter_bytes=s.max_resident_adapter_bytes)
        view = BoardView(APP_NAME)
        rt = build_runtime(s, engine=RayEngine(handle, limits, view, s.replicas))

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
    """For `serve run hotpeft.server.ray_serve:app`: settings from HOTPEFT_* (and `args`, flag names as keys)."""
    return deployments(Settings(**(args or {})))
