"""Operations: liveness, readiness, Prometheus metrics and the built-in dashboard."""
import asyncio
from importlib import resources

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from hotpeft.server.deps import RuntimeDep

router = APIRouter(tags=["ops"])


@router.get("/health")
async def health() -> dict:
    """The process is alive and its event loop answers."""
    return {"status": "ok"}


@router.get("/ready")
async def ready(request: Request):
    """The model is loaded, the engine's loop is alive and stepping, and the server is not draining."""
    runtime = getattr(request.app.state, "runtime", None)
    if runtime is None:
        return JSONResponse({"status": "not ready", "reason": "loading"}, status_code=503)
    stats = runtime.engine.stats()
    replicas = stats.replicas  # behind Ray Serve, as posted within seconds
    reason = None
    if request.app.state.lifecycle.draining:
        reason = "draining"
    elif replicas is not None and not replicas.up:
        reason = f"no engine replica is up (0 of {replicas.target})"
    elif not stats.alive:
        reason = "engine stopped"
    elif stats.stalled_s > runtime.settings.stall_timeout:
        reason = f"engine stalled: no step for {stats.stalled_s:.0f} s with work waiting (--stall-timeout)"
    http = {"in_flight": request.app.state.lifecycle.in_flight}
    engine = stats.as_dict()
    if reason:
        return JSONResponse({"status": "not ready", "reason": reason, "engine": engine, "http": http}, status_code=503)
    problem = runtime.catalog.registry_problem
    if problem:  # still serving what it knows: stay in rotation, say what is wrong
        return {"status": "degraded", "reason": f"registry unreachable: {problem}", "engine": engine, "http": http}
    if replicas is not None and replicas.up < replicas.target:
        return {"status": "degraded", "reason": f"{replicas.up} of {replicas.target} engine replicas are up",
                "engine": engine, "http": http}
    return {"status": "ready", "engine": engine, "http": http}


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(rt: RuntimeDep) -> Response:
    """Prometheus text format; names prefixed hotpeft_ (see server/metrics.py)."""
    body = await asyncio.to_thread(rt.metrics.render)
    return Response(body, media_type=CONTENT_TYPE_LATEST)


@router.get("/dashboard", response_class=HTMLResponse)
async def dashboard() -> HTMLResponse:
    """One page, nothing fetched from elsewhere; it polls /dashboard/data every 2 s."""
    return HTMLResponse(resources.files("hotpeft.server").joinpath("static/dashboard.html").read_text())


@router.get("/dashboard/data")
async def dashboard_data(rt: RuntimeDep) -> dict:
    """The last ten minutes per adapter (10-second buckets), the engine now, the tiers, the jobs."""

    def build() -> dict:
        data = rt.metrics.window()
        stats = rt.engine.stats()
        data["base"] = rt.base.model_id
        data["engine"] = {"running": stats.running, "waiting": stats.waiting, "kv_used_tokens": stats.kv_tokens,
                          "kv_capacity_tokens": stats.kv_capacity_tokens, "steps": stats.steps,
                          "failed_steps": stats.failed_steps, "kv_blocks": stats.kv_blocks,
                          "kv_blocks_free": stats.kv_blocks_free, "preemptions": stats.preemptions,
                          "prefix_hit_tokens": stats.prefix_hit_tokens,
                          "prefix_query_tokens": stats.prefix_query_tokens}
        cache = rt.catalog.cache
        data["tiers"] = {
            "device": {"adapters": stats.resident_loras, "bytes": stats.resident_lora_bytes,
                       "limit": stats.max_resident_lora_bytes, **stats.as_dict()["adapters"]},
            "cpu": {"adapters": len(cache.keys()), "bytes": cache.nbytes(), "limit": cache.max_bytes, **cache.counts},
        }
        jobs, _ = rt.jobs.store.list_jobs(limit=10)
        data["jobs"] = [{"id": j.id, "adapter": j.adapter_name, "method": j.config.get("method"), "status": j.status,
                         "stage": j.stage, "progress": j.progress, "created_at": j.created_at} for j in jobs]
        return data

    return await asyncio.to_thread(build)
