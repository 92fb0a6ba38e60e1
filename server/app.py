"""The FastAPI application. `create_app(settings)`; the model loads in the lifespan, not at import."""
from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI

from hotpeft.server.config import Settings
from hotpeft.server.errors import install_error_handlers
from hotpeft.server.guard import Guard, Lifecycle
from hotpeft.server.api.router import api_router
from hotpeft.server.runtime import build_runtime

log = logging.getLogger("hotpeft.server")


def create_app(settings: Settings | None = None, runtime_builder=build_runtime) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # Loading takes seconds: keep it off the event loop so the process stays responsive.
        runtime = await asyncio.to_thread(runtime_builder, settings)
        engine, catalog = runtime.engine, runtime.catalog
        engine.start()
        # Deleted versions leave the engine once no running request uses them.
        catalog.on_removed.append(engine.forget)
        catalog.watch()
        runtime.jobs.start()
        app.state.runtime = runtime
        log.info("serving %s and %d adapter(s)", runtime.base.model_id, len(catalog.active()))
        try:
            yield
        finally:
            runtime.jobs.stop()
            engine.stop()
            catalog.close()

    app = FastAPI(title="hotpeft", version="0.1.0", lifespan=lifespan)
    app.state.lifecycle = Lifecycle()
    app.add_middleware(Guard, settings=settings, lifecycle=app.state.lifecycle)
    install_error_handlers(app)
    app.include_router(api_router)
    return app
