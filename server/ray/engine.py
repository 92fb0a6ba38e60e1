"""The ingress's engine behind Ray Serve: every request goes to an engine replica; the HTTP layer
sees the same `Engine` interface as with the local engine.

Stats, residency and pins are the engine replicas' own, as last posted on the board (at most
about a second old), summed or merged; load and unload run on every engine replica up at that
moment.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import operator
from dataclasses import fields

from ray.exceptions import RayError, RayTaskError
from ray.serve.exceptions import BackPressureError, RayServeException

from hotpeft.server.engine.interface import (
    AdapterCounters, Engine, EngineFailure, EngineStats, EventSink, GenerationRequest, Overloaded, ReplicaStats,
    ReplicaUnavailable, Residency, ShuttingDown, TokenEvent,
)
from hotpeft.server.ray.board import BoardView
from hotpeft.server.ray.settings import BASE_ID

log = logging.getLogger("hotpeft.ray")

# summed over the replicas; the rest are the largest of them, or said otherwise below
SUMMED = ("running", "waiting", "slots", "kv_tokens", "kv_bytes", "steps", "tokens", "failed_steps", "resident_loras",
          "resident_lora_bytes", "max_resident_lora_bytes", "kv_capacity_tokens", "kv_blocks", "kv_blocks_free",
          "kv_blocks_cached", "preempted", "preemptions", "prefix_hit_tokens", "prefix_query_tokens",
          "prefix_evictions")


class RayEngine(Engine):
    def __init__(self, handle, view: BoardView, target: int) -> None:
        self.handle = handle
        self.view = view
        self.target = target
        self._open: dict[int, object] = {}  # request id -> Serve's streaming response
        self._aborted: dict[int, str] = {}  # request id -> why abort_all ended it

    # ---- what the replicas posted -------------------------------------------------------------
    def residency(self) -> Residency:
        replicas = self.view.replicas()
        placement = {rid: {**{k: "cpu" for k in state.get("cpu", ())}, **{k: "device" for k in state.get("resident", ())}}
                     for rid, state in replicas.items()}
        return Residency(device=frozenset(k for s in replicas.values() for k in s.get("resident", ())),
                         pinned=frozenset(k for s in replicas.values() for k in s.get("pinned", ())),
                         replicas=placement)

    def stats(self) -> EngineStats:
        replicas = dict(sorted(self.view.replicas().items()))
        each = [EngineStats.from_dict(state["stats"]) for state in replicas.values() if "stats" in state]
        summed = {f.name: sum(getattr(s, f.name) for s in each) for f in fields(EngineStats) if f.name in SUMMED}
        return EngineStats(
            **summed, max_seq_tokens=max((s.max_seq_tokens for s in each), default=0),
            block_size=max((s.block_size for s in each), default=0),
            adapters=functools.reduce(operator.add, (s.adapters for s in each), AdapterCounters()),
            alive=any(s.alive for s in each), stalled_s=max((s.stalled_s for s in each), default=0.0),
            replicas=ReplicaStats(up=len(replicas), target=self.target, ids=list(replicas),
                                  registry_generation={rid: r.get("generation") for rid, r in replicas.items()},
                                  resident={rid: r.get("resident", []) for rid, r in replicas.items()}),
            in_flight=len(self._open),
        )

    # ---- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        self.view.start()

    def stop(self) -> None:
        self.view.stop()
        self.abort_all("the server is shutting down")

    def abort_all(self, why: str) -> None:
        for request_id, response in list(self._open.items()):
            self._aborted[request_id] = why  # its stream ends with ShuttingDown(why), as the local engine's do
            response.cancel()

    # ---- requests -----------------------------------------------------------------------------
    def submit(self, request: GenerationRequest, sink: EventSink) -> None:
        """Send the request to a replica (Serve picks one holding its adapter); its events are
        pumped into `sink` on the sink's event loop."""
        key = BASE_ID if request.adapter is None else request.adapter.key
        payload = {"prompt_ids": request.prompt_ids, "params": request.params.to_wire()}
        if request.adapter is not None and request.adapter.recipe is not None:
            payload["recipe"] = request.adapter.recipe  # a mix: the replica builds it from the same versions
        response = self.handle.options(multiplexed_model_id=key, stream=True).generate.remote(payload)
        self._open[request.request_id] = response
        asyncio.run_coroutine_threadsafe(self._pump(request.request_id, response, sink), sink.loop)

    def cancel(self, request_id: int) -> None:
        response = self._open.pop(request_id, None)
        if response is not None:
            response.cancel()

    async def _pump(self, request_id: int, response, sink: EventSink) -> None:
        replica = None
        try:
            async for batch in response:
                for item in batch:
                    if "replica" in item:
                        replica = item["replica"]
                        continue
                    sink.put(TokenEvent(**item, replica=replica))
        except Exception as e:  # noqa: BLE001 - every failure reaches the request as its error event
            why = self._aborted.pop(request_id, None)
            if request_id in self._open:  # not cancelled by its client
                error = ShuttingDown(why) if why is not None else _as_engine_error(e, replica)
                sink.put(TokenEvent("", [], error=error, replica=replica))
        finally:
            self._aborted.pop(request_id, None)
            if self._open.pop(request_id, None) is not None:
                response.cancel()

    # ---- residency on every replica -----------------------------------------------------------
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


def _as_engine_error(e: BaseException, replica: str | None) -> BaseException:
    """Ray's exceptions as the engine's own: the HTTP layer maps those to statuses."""
    if isinstance(e, RayTaskError):  # raised inside the replica: its own error (an instance of the cause too)
        cause = e.as_instanceof_cause()
        if isinstance(cause, Exception) and not isinstance(cause, RayTaskError):
            return cause
        return EngineFailure(f"generation failed on replica {replica}: {e.cause!r}")
    if isinstance(e, BackPressureError):
        return Overloaded(f"every engine replica is at capacity: {e}; retry shortly", retry_after=1)
    if isinstance(e, (RayError, RayServeException)):  # the replica died, or none is up yet
        where = f"the engine replica {replica} running this request went away" if replica else \
            "no engine replica could take this request"
        return ReplicaUnavailable(f"{where} ({type(e).__name__}); retry: Ray Serve sends new requests to the "
                                  "remaining replicas and restarts lost ones")
    return EngineFailure(f"generation failed: {type(e).__name__}: {e}")
