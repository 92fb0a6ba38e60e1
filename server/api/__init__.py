"""hotpeft.server.api: the HTTP API. `routes/` one router per resource, `schemas/` their bodies,
`router.py` gathers them."""
