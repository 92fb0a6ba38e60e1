"""An engine replica of the Ray Serve application: one model, one batching engine, its own tiers.

Its methods are called through a deployment handle: `generate` streams a request's events
(routed by Serve to a replica holding the request's adapter, `multiplexed_model_id`); the board
(board.py) carries its state to the ingress every second and the ingress's load / unload
commands back.
"""
from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator

from ray import serve

from hotpeft.adapters.errors import AdapterNotFound
from hotpeft.server.engine.interface import EventSink, GenerationRequest, SamplingParams
from hotpeft.server.ray.board import REPLICA as REPLICA_ROLE, Poster
from hotpeft.server.ray.settings import APP_NAME, settings_from_env
from hotpeft.server.runtime import build_runtime, load_and_pin, unpin_and_unload

log = logging.getLogger("hotpeft.ray")

MAX_RECIPES = 256  # mix recipes a replica remembers (a mix is rebuilt from its recipe when asked again)


class EngineReplica:
    """One model, one engine, its own tiers. Methods are called through a deployment handle."""

    def __init__(self) -> None:
        settings = settings_from_env()
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
        request = GenerationRequest(payload["prompt_ids"], SamplingParams.from_wire(payload["params"]), adapter)
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
                    out.append(ev.wire())
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
        held = engine.residency()
        state = {"stats": engine.stats().as_dict(), "generation": catalog.snapshot.generation,
                 "registry_problem": catalog.registry_problem, "resident": sorted(held.device),
                 "pinned": sorted(held.pinned), "cpu": sorted(catalog.cache.keys())}
        return state, [f for f in self.rt.metrics.registry.collect() if f.samples]

    def _execute(self, command: dict) -> dict:
        """A board command (from the poster's thread): load / unload on this replica, as the
        routes do on a single server."""
        if command["op"] == "load":
            async def load() -> bool:
                return await load_and_pin(self.rt, await self._version(command["key"]), command["pin"])

            return {"changed": asyncio.run(load())}
        if command["op"] == "unload":
            return {"unloaded": sorted(asyncio.run(unpin_and_unload(self.rt, set(command["keys"]))))}
        raise ValueError(f"unknown board command {command['op']!r}")
