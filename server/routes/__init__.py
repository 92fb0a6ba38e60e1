"""All routers, gathered."""
from fastapi import APIRouter

from hotpeft.server.routes import adapters, files, jobs, openai, ops

api_router = APIRouter()
api_router.include_router(ops.router)
api_router.include_router(openai.router)
api_router.include_router(adapters.router)
api_router.include_router(files.router)
api_router.include_router(jobs.router)
