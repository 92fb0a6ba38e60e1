"""Operations: liveness, readiness and Prometheus metrics."""
import asyncio

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from hotpeft.server.deps import RuntimeDep

router = APIRouter(tags=["ops"])


@router.get("/health")
async def health() -> dict:
    """The process is alive and its event loop answers."""
    return {"status": "ok"}


@router.get("/ready")
async def ready(rt: RuntimeDep):
    """The model is loaded and the engine's worker is alive."""
    stats = rt.engine.stats()
    if not stats["alive"]:
        return JSONResponse({"status": "not ready", "engine": stats}, status_code=503)
    return {"status": "ready", "engine": stats}


@router.get("/metrics")
async def metrics(rt: RuntimeDep) -> Response:
    """Prometheus text format; names prefixed hotpeft_ (see server/metrics.py)."""
    body = await asyncio.to_thread(generate_latest, rt.metrics.registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
