"""`/v1/files`: training data uploads (purpose `fine-tune`), checked line by line on upload.

The files' content is never served back: it is read only by the jobs that name it.
"""
from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from fastapi import APIRouter, Request
from starlette.datastructures import UploadFile

from hotpeft.server.deps import RuntimeDep
from hotpeft.server.errors import InvalidRequest, PayloadTooLarge
from hotpeft.server.runtime import Runtime
from hotpeft.server.api.schemas.fine_tuning import FileDeleted, FileList, FileObject
from hotpeft.server.uploads import limited_form
from hotpeft.trainer.data import check_count, parse_jsonl
from hotpeft.trainer.errors import DatasetInvalid
from hotpeft.trainer.jobs import FileRecord, new_id

router = APIRouter(prefix="/v1/files", tags=["files"])
PURPOSE = "fine-tune"


def _public(f: FileRecord) -> FileObject:
    return FileObject(id=f.id, bytes=f.bytes, created_at=f.created_at, filename=f.filename, purpose=f.purpose)


def _too_large(size: int, limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"the file is {size} bytes or more, over --max-file-bytes {limit}; split it or start the "
                           "server with a larger --max-file-bytes", param="file")


def _store(rt: Runtime, filename: str, data: bytes) -> FileRecord:
    """Check every line, then write the file (temp + rename) and only then its record."""
    try:
        records = parse_jsonl(data, what=f"file {filename!r}")
        check_count(records, f"file {filename!r}", 1)
    except DatasetInvalid as e:
        e.param = "file"
        raise
    store = rt.jobs.store
    file_id = new_id("file")
    target = store.file_path(file_id)
    tmp = target.with_suffix(".tmp")
    with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, target)
    record = FileRecord(file_id, filename, PURPOSE, len(data), int(time.time()), len(records), records[0].format)
    try:
        return store.add_file(record)
    except BaseException:
        target.unlink(missing_ok=True)
        raise


_UPLOAD_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file", "purpose"],
    "properties": {"file": {"type": "string", "format": "binary"}, "purpose": {"type": "string", "enum": [PURPOSE]}}}}}}}


@router.post("", response_model=FileObject, openapi_extra=_UPLOAD_BODY)
async def upload_file(request: Request, rt: RuntimeDep) -> FileObject:
    limit = rt.settings.max_file_bytes
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise InvalidRequest("POST /v1/files takes multipart/form-data with 'file' and 'purpose'", param="file")
    form = await limited_form(request, limit, lambda seen: _too_large(seen, limit), max_files=1, max_fields=2)
    try:
        for key in form.keys():
            if key not in ("file", "purpose"):
                raise InvalidRequest(f"Unrecognized request argument supplied: {key}", param=key)
        upload, purpose = form.get("file"), form.get("purpose")
        if not isinstance(upload, UploadFile):
            raise InvalidRequest("Missing required parameter: 'file'", param="file")
        if purpose is None:
            raise InvalidRequest("Missing required parameter: 'purpose'", param="purpose")
        if purpose != PURPOSE:
            raise InvalidRequest(f"hotpeft accepts files for purpose {PURPOSE!r} only, got {purpose!r}",
                                 param="purpose")
        data = await upload.read()
        if len(data) > limit:
            raise _too_large(len(data), limit)
        filename = Path(upload.filename or "upload.jsonl").name
    finally:
        await form.close()
    return _public(await asyncio.to_thread(_store, rt, filename, data))


@router.get("", response_model=FileList)
async def list_files(rt: RuntimeDep, purpose: str | None = None) -> FileList:
    files = await asyncio.to_thread(rt.jobs.store.list_files, purpose)
    return FileList(data=[_public(f) for f in files])


@router.get("/{file_id}", response_model=FileObject)
async def get_file(file_id: str, rt: RuntimeDep) -> FileObject:
    return _public(await asyncio.to_thread(rt.jobs.store.get_file, file_id))


@router.delete("/{file_id}", response_model=FileDeleted)
async def delete_file(file_id: str, rt: RuntimeDep) -> FileDeleted:
    await asyncio.to_thread(rt.jobs.store.delete_file, file_id)
    return FileDeleted(id=file_id)
