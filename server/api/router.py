"""All routers, gathered; every route documents the errors it may answer in OpenAI's shape."""
from fastapi import APIRouter

from hotpeft.server.api.routes import adapters, files, jobs, openai, ops
from hotpeft.server.api.schemas.openai import ERROR_RESPONSES

api_router = APIRouter()
for module in (ops, openai, adapters, files, jobs):
    api_router.include_router(module.router, responses=ERROR_RESPONSES)
