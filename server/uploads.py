"""Multipart uploads with a size limit that holds while the body arrives, not after it was spooled."""
from __future__ import annotations

from collections.abc import Callable

from fastapi import Request

FORM_OVERHEAD = 64 << 10  # multipart boundaries, headers and the small fields


async def limited_form(request: Request, limit: int, too_large: Callable[[int], Exception], *, max_files: int,
                       max_fields: int):
    """The multipart form, refused with `too_large(bytes seen)` as soon as the body passes `limit`
    (+ form overhead)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit + FORM_OVERHEAD:
        raise too_large(int(declared))
    seen = 0

    async def receive():
        nonlocal seen
        message = await request.receive()
        seen += len(message.get("body", b""))
        if seen > limit + FORM_OVERHEAD:
            raise too_large(seen)
        return message

    return await Request(request.scope, receive).form(max_files=max_files, max_fields=max_fields)
