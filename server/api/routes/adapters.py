"""The adapter admin API: register (upload or import), list, show, promote, load/unload, delete, merge.

Registry and store calls block (database, disk, validation of tensors): they run in a worker
thread, never on the event loop. Residency changes run on the engine's thread between steps.
"""
from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

from fastapi import APIRouter, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from hotpeft.adapters.catalog import Registered
from hotpeft.adapters.errors import AdapterInvalid, AdapterNotFound, AdapterTooLarge
from hotpeft.adapters.format import CONFIG_FILE, PICKLE_SUFFIXES, WEIGHTS_FILE
from hotpeft.adapters.names import parse_model_ref, validate_name
from hotpeft.adapters.registry import VersionRecord
from hotpeft.server.deps import RuntimeDep
from hotpeft.server.errors import ForbiddenPath, InvalidRequest
from hotpeft.server.runtime import Runtime, load_and_pin, unpin_and_unload
from hotpeft.server.uploads import limited_form
from hotpeft.server.api.schemas.adapters import (
    AdapterDeleted, AdapterImport, AdapterList, AdapterMerge, AdapterPromote, AdapterPublic, AdapterRegistered,
    AdapterResidency, AdapterTiers, AdapterVersionPublic, ResidencyChange,
)

router = APIRouter(prefix="/v1/adapters", tags=["adapters"])

UPLOAD_FILES = (CONFIG_FILE, WEIGHTS_FILE, "chat_template.jinja", "tokenizer_config.json")
IGNORED_FILES = ("README.md",)  # the model card PEFT's save_pretrained writes: accepted, not stored


# ---- views ---------------------------------------------------------------------------------------
def _residency(rt: Runtime, key: str) -> str:
    if key in rt.engine.residency().device:
        return "device"
    return "cpu" if key in rt.catalog.cache else "disk"  # listing must not reorder the LRU


def _version_public(rt: Runtime, r: VersionRecord) -> AdapterVersionPublic:
    snap = rt.catalog.snapshot
    held = rt.engine.residency()
    return AdapterVersionPublic(
        name=r.name, version=r.version, kind=r.kind, active=snap.active.get(r.name) == r.version,
        residency=_residency(rt, r.key), replicas=held.placement(r.key),
        pinned=r.key in held.pinned or r.key in rt.catalog.cache.pinned,
        base_model=r.base_model, base_fingerprint=r.base_fingerprint, rank=r.rank, alpha=r.alpha,
        target_modules=r.target_modules, num_virtual_tokens=r.num_virtual_tokens, size_bytes=r.size_bytes,
        sha256=r.sha256, created=int(r.created), source=r.source, source_detail=r.source_detail, metrics=r.metrics,
        description=r.description, warnings=r.warnings,
    )


def _adapter_public(rt: Runtime, name: str) -> AdapterPublic:
    snap = rt.catalog.snapshot
    if name not in snap.versions:
        raise AdapterNotFound(f"adapter {name!r} does not exist", param="name")
    versions = [_version_public(rt, r) for _, r in sorted(snap.versions[name].items())]
    return AdapterPublic(name=name, active_version=snap.active[name], versions=versions)


def _record(rt: Runtime, name: str, version: int | None = None) -> VersionRecord:
    validate_name(name, param="name")
    record = rt.catalog.resolve(name if version is None else f"{name}@{version}", param="name").record
    if record is None:
        raise InvalidRequest("the base model is always resident; name an adapter", param="name")
    return record


# ---- registration --------------------------------------------------------------------------------
_REGISTER_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["name", "files"], "properties": {
        "name": {"type": "string"}, "description": {"type": "string"},
        "force_new_version": {"type": "boolean", "description": "add a version even when the content is that of "
                                                                 "an existing one"},
        "files": {"type": "array", "items": {"type": "string", "format": "binary"},
                  "description": "adapter_config.json, adapter_model.safetensors, optionally chat_template.jinja"}}}},
    "application/json": {"schema": AdapterImport.model_json_schema()},
}}}


@router.post("", response_model=AdapterRegistered, status_code=201, openapi_extra=_REGISTER_BODY,
             responses={200: {"model": AdapterRegistered, "description": "the content is that of an existing "
                                                                         "version, which is returned (unchanged: true)"}})
async def register(request: Request, response: Response, rt: RuntimeDep) -> AdapterRegistered:
    """multipart/form-data: `name`, optional `description`, files adapter_config.json and
    adapter_model.safetensors (optionally chat_template.jinja / tokenizer_config.json);
    or JSON `{"name", "path"}` with `path` under an --import-root. 201 with the new version; 200
    with `unchanged: true` when that content is already a version of `name` (made active if it
    was not), unless `force_new_version` is true."""
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        done = await _register_upload(request, rt)
    elif content_type.startswith("application/json"):
        done = await _register_import(request, rt)
    else:
        raise InvalidRequest(
            "POST /v1/adapters takes multipart/form-data (name + adapter files) or JSON {\"name\", \"path\"}; "
            f"got content-type {content_type or 'none'!r}"
        )
    if done.unchanged:
        response.status_code = 200
    return AdapterRegistered(**_version_public(rt, done.record).model_dump(), unchanged=done.unchanged)


def _too_large(size: int, limit: int) -> AdapterTooLarge:
    return AdapterTooLarge(
        f"the adapter upload is {size} bytes or more, over --max-adapter-bytes {limit}; "
        "start the server with a larger --max-adapter-bytes to accept it", param="adapter_model.safetensors",
    )


def _register(rt: Runtime, name: str, folder: Path, force_new_version: bool, **how) -> Registered:
    if force_new_version:
        return Registered(rt.catalog.register_dir(name, folder, **how), unchanged=False)
    return rt.catalog.register_or_reuse(name, folder, **how)


def _flag(value: str, field: str) -> bool:
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off", ""):
        return False
    raise InvalidRequest(f"{field} must be true or false, got {value!r}", param=field)


async def _register_upload(request: Request, rt: RuntimeDep) -> Registered:
    limit = rt.settings.max_adapter_bytes
    form = await limited_form(request, limit, lambda seen: _too_large(seen, limit),
                              max_files=len(UPLOAD_FILES) + len(IGNORED_FILES), max_fields=5)
    try:
        fields, files = {}, {}
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                fname = Path(value.filename or key).name
                if fname.endswith(PICKLE_SUFFIXES):
                    raise AdapterInvalid(f"{fname!r} is a pickle file, which hotpeft never loads; upload "
                                         f"{WEIGHTS_FILE} (save_pretrained(..., safe_serialization=True))", param=fname)
                if fname in IGNORED_FILES:
                    continue
                if fname not in UPLOAD_FILES:
                    raise AdapterInvalid(f"unexpected file {fname!r}; upload {', '.join(UPLOAD_FILES)}", param=fname)
                if fname in files:
                    raise AdapterInvalid(f"file {fname!r} is given twice", param=fname)
                files[fname] = value
            elif key in ("name", "description", "force_new_version"):
                fields[key] = value
            else:
                raise InvalidRequest(f"unexpected form field {key!r}; send name, description, force_new_version and "
                                     "the adapter files", param=key)
        if "name" not in fields:
            raise InvalidRequest("Missing required parameter: 'name'", param="name")
        name = validate_name(fields["name"])
        for required in (CONFIG_FILE, WEIGHTS_FILE):
            if required not in files:
                raise AdapterInvalid(f"missing file {required!r} in the upload", param=required)
        if files[WEIGHTS_FILE].size is not None and files[WEIGHTS_FILE].size > limit:
            raise _too_large(files[WEIGHTS_FILE].size, limit)

        force = _flag(fields.get("force_new_version", ""), "force_new_version")

        def stage_and_register() -> Registered:
            with rt.catalog.store.staging() as staged:
                for fname, upload in files.items():
                    upload.file.seek(0)
                    with open(staged / fname, "wb") as out:
                        shutil.copyfileobj(upload.file, out)
                return _register(rt, name, staged, force, source="upload", label="upload",
                                 description=fields.get("description", ""))

        return await asyncio.to_thread(stage_and_register)
    finally:
        await form.close()


async def _register_import(request: Request, rt: RuntimeDep) -> Registered:
    try:
        body = AdapterImport.model_validate(await request.json())
    except ValidationError as e:
        raise RequestValidationError(e.errors()) from e
    except ValueError as e:  # not JSON
        raise InvalidRequest(f"We could not parse the JSON body of your request: {e}") from e
    name = validate_name(body.name)
    folder = _import_folder(body.path, rt.settings.import_root)
    weights = folder / WEIGHTS_FILE
    if weights.is_file() and weights.stat().st_size > rt.settings.max_adapter_bytes:
        raise _too_large(weights.stat().st_size, rt.settings.max_adapter_bytes)
    return await asyncio.to_thread(_register, rt, name, folder, body.force_new_version, source="import",
                                   label=body.path, description=body.description, source_detail={"path": body.path})


def _import_folder(raw: str, roots: list[Path]) -> Path:
    """`raw` with symlinks resolved, if it and every adapter file in it lie under an import root."""
    if not roots:
        raise ForbiddenPath("registering by path is disabled on this server; start it with --import-root DIR, "
                            "or upload the files as multipart/form-data", param="path")
    if "\x00" in raw or not os.path.isabs(raw):
        raise InvalidRequest(f"path {raw!r} must be an absolute path without NUL bytes", param="path")
    real_roots = [Path(os.path.realpath(r)) for r in roots]

    def inside(p: Path) -> bool:
        real = Path(os.path.realpath(p))
        return any(real == r or r in real.parents for r in real_roots)

    folder = Path(os.path.realpath(raw))
    if not inside(folder):
        raise ForbiddenPath(f"path {raw!r} is not under an import root (--import-root); symlinks are resolved "
                            "before this check", param="path")
    for fname in UPLOAD_FILES:
        if (folder / fname).exists() and not inside(folder / fname):
            raise ForbiddenPath(f"{fname} in {raw!r} is a symlink that leaves the import roots", param="path")
    return folder


# ---- reading -------------------------------------------------------------------------------------
@router.get("", response_model=AdapterList)
async def list_adapters(rt: RuntimeDep) -> AdapterList:
    names = sorted(rt.catalog.snapshot.versions)
    stats = rt.engine.stats()
    tiers = AdapterTiers(cpu_bytes=rt.catalog.cache.nbytes(), max_cpu_bytes=rt.catalog.cache.max_bytes,
                         device_bytes=stats.resident_lora_bytes, max_device_bytes=stats.max_resident_lora_bytes,
                         device_adapters=stats.resident_loras)
    return AdapterList(data=[_adapter_public(rt, n) for n in names], tiers=tiers)


@router.get("/{ref}", response_model=AdapterPublic | AdapterVersionPublic)
async def show_adapter(ref: str, rt: RuntimeDep):
    """`name`: the adapter with every version; `name@N`: that version."""
    parsed = parse_model_ref(ref, param="name")
    if parsed.version is None:
        return _adapter_public(rt, parsed.name)
    return _version_public(rt, _record(rt, parsed.name, parsed.version))


# ---- changing ------------------------------------------------------------------------------------
@router.post("/merge", response_model=AdapterVersionPublic, status_code=201)
async def merge(body: AdapterMerge, rt: RuntimeDep) -> AdapterVersionPublic:
    validate_name(body.name)
    sources = [(s.name, s.weight) for s in body.sources]
    record = await asyncio.to_thread(rt.catalog.register_merge, body.name, sources, body.strategy,
                                     density=body.density, description=body.description)
    return _version_public(rt, record)


@router.post("/{name}/promote", response_model=AdapterPublic)
async def promote(name: str, body: AdapterPromote, rt: RuntimeDep) -> AdapterPublic:
    validate_name(name)
    await asyncio.to_thread(rt.catalog.promote, name, body.version)
    return _adapter_public(rt, name)


@router.post("/{name}/load", response_model=ResidencyChange)
async def load(name: str, rt: RuntimeDep, body: AdapterResidency | None = None) -> ResidencyChange:
    body = body or AdapterResidency()
    record = _record(rt, name, body.version)
    av = await asyncio.to_thread(rt.catalog.load, record)
    loaded = await load_and_pin(rt, av, body.pin)
    return ResidencyChange(name=record.name, version=record.version, residency=_residency(rt, av.key),
                           pinned=body.pin or av.key in rt.engine.residency().pinned, changed=loaded)


@router.post("/{name}/unload", response_model=ResidencyChange)
async def unload(name: str, rt: RuntimeDep, body: AdapterResidency | None = None) -> ResidencyChange:
    """Back to disk: unpinned, out of the CPU tier, and out of the engine unless running requests use it."""
    body = body or AdapterResidency()
    if body.pin:
        raise InvalidRequest("unload cannot pin; use POST /v1/adapters/{name}/load with {\"pin\": true}", param="pin")
    record = _record(rt, name, body.version)
    left = await unpin_and_unload(rt, {record.key})
    return ResidencyChange(name=record.name, version=record.version, residency=_residency(rt, record.key),
                           pinned=False, changed=bool(left))


@router.delete("/{ref}", response_model=AdapterDeleted)
async def delete(ref: str, rt: RuntimeDep) -> AdapterDeleted:
    """`name`: every version; `name@N`: one. Running requests finish on what they started with."""
    parsed = parse_model_ref(ref, param="name")
    removed = await asyncio.to_thread(rt.catalog.delete, parsed.name, parsed.version)
    return AdapterDeleted(name=parsed.name, versions=sorted(r.version for r in removed),
                          active_version=rt.catalog.snapshot.active.get(parsed.name))
