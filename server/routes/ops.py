"""Operations: liveness and readiness."""
from fastapi import APIRouter
from fastapi.responses import JSONResponse

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
