"""`hotpeft adapters ...`: the admin API from the shell. Talks to a running server over HTTP.

    hotpeft adapters list
    hotpeft adapters show NAME[@N]
    hotpeft adapters add NAME FOLDER [--description TEXT] [--by-path]
    hotpeft adapters rm NAME[@N]
    hotpeft adapters load NAME [--version N] [--pin]
    hotpeft adapters unload NAME [--version N]
    hotpeft adapters promote NAME VERSION
    hotpeft adapters merge NAME SOURCE=WEIGHT ... [--strategy S] [--density D]

--url (env HOTPEFT_URL) and --api-key (an admin key of a server started with keys; env
HOTPEFT_ADMIN_KEY, else HOTPEFT_API_KEY) and --json go before or after the operation. Prints a table
or a sentence naming what changed (--json: the server's JSON answer); on an error prints its
message and exits 1.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from hotpeft.cli import views

UPLOADED = ("adapter_config.json", "adapter_model.safetensors", "chat_template.jinja", "tokenizer_config.json")
STRATEGIES = ("linear", "cat", "svd", "ties", "dare_linear", "dare_ties")
DEFAULT_URL = "http://127.0.0.1:8000"


def _connection(defaults: bool) -> argparse.ArgumentParser:
    """--url and --api-key, accepted before the operation (`defaults`) and after it. After it they
    default to SUPPRESS, so that a value given before the operation is not overwritten."""
    p = argparse.ArgumentParser(add_help=False)
    unset = argparse.SUPPRESS
    p.add_argument("--url", default=os.environ.get("HOTPEFT_URL", DEFAULT_URL) if defaults else unset,
                   help=f"the server (env HOTPEFT_URL; default {DEFAULT_URL})")
    p.add_argument("--api-key", default=_default_key() if defaults else unset, metavar="KEY",
                   help="bearer key sent to a server started with --admin-key: these operations need an admin key "
                        "(env: the first of HOTPEFT_ADMIN_KEY, else of HOTPEFT_API_KEY)")
    p.add_argument("--json", action="store_true", default=False if defaults else unset,
                   help="print the server's JSON answer instead of a table")
    return p


def _default_key() -> str | None:
    # The admin key first: a shell that started a server with both keys holds the inference key in
    # HOTPEFT_API_KEY, and these operations need the admin one.
    for var in ("HOTPEFT_ADMIN_KEY", "HOTPEFT_API_KEY"):
        keys = [k.strip() for k in os.environ.get(var, "").split(",") if k.strip()]
        if keys:
            return keys[0]
    return None


def add_parser(sub) -> None:
    p = sub.add_parser("adapters", help="list, add, remove, load, promote and merge adapters on a running server",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                       parents=[_connection(defaults=True)])
    ops = p.add_subparsers(dest="op", metavar="OP", required=True)
    common = [_connection(defaults=False)]

    def op(name: str, help_text: str) -> argparse.ArgumentParser:
        return ops.add_parser(name, help=help_text, parents=common)

    op("list", "every adapter, its versions and where each is resident")
    show = op("show", "one adapter (NAME) or one version (NAME@N)")
    show.add_argument("ref")
    add = op("add", "register FOLDER (a PEFT adapter folder) as a new version of NAME")
    add.add_argument("name")
    add.add_argument("folder")
    add.add_argument("--description", default="")
    add.add_argument("--by-path", action="store_true",
                     help="send the folder's path instead of its files (it must be under the server's --import-root)")
    add.add_argument("--force-new-version", action="store_true",
                     help="add a version even when the content is that of an existing version of NAME")
    rm = op("rm", "delete NAME (every version) or NAME@N")
    rm.add_argument("ref")
    for name, what in (("load", "make resident in the engine"), ("unload", "drop to disk")):
        q = op(name, what)
        q.add_argument("name")
        q.add_argument("--version", type=int)
        if name == "load":
            q.add_argument("--pin", action="store_true", help="never evict it")
    promote = op("promote", "make VERSION the active one (roll back or forward)")
    promote.add_argument("name")
    promote.add_argument("version", type=int)
    merge = op("merge", "register a weighted combination of LoRA adapters as NAME")
    merge.add_argument("name")
    merge.add_argument("sources", nargs="+", metavar="SOURCE=WEIGHT")
    merge.add_argument("--strategy", default="linear", choices=STRATEGIES)
    merge.add_argument("--density", type=float)
    merge.add_argument("--description", default="")


def _sources(items: list[str]) -> list[dict]:
    out = []
    for item in items:
        name, sep, weight = item.rpartition("=")
        if not sep or not name:
            raise SystemExit(f"hotpeft adapters merge: {item!r} is not SOURCE=WEIGHT")
        try:
            out.append({"name": name, "weight": float(weight)})
        except ValueError:
            raise SystemExit(f"hotpeft adapters merge: the weight in {item!r} is not a number") from None
    return out


def _request(client, args: argparse.Namespace):
    op = args.op
    if op == "list":
        return client.get("/v1/adapters")
    if op == "show":
        return client.get(f"/v1/adapters/{args.ref}")
    if op == "rm":
        return client.delete(f"/v1/adapters/{args.ref}")
    if op == "promote":
        return client.post(f"/v1/adapters/{args.name}/promote", json={"version": args.version})
    if op in ("load", "unload"):
        body = {"version": args.version} if args.version else {}
        if op == "load" and args.pin:
            body["pin"] = True
        return client.post(f"/v1/adapters/{args.name}/{op}", json=body)
    if op == "merge":
        return client.post("/v1/adapters/merge", json={
            "name": args.name, "sources": _sources(args.sources), "strategy": args.strategy,
            "density": args.density, "description": args.description,
        })
    folder = Path(args.folder)
    if args.by_path:
        return client.post("/v1/adapters", json={"name": args.name, "path": str(folder.resolve()),
                                                 "description": args.description,
                                                 "force_new_version": args.force_new_version})
    if not folder.is_dir():
        raise SystemExit(f"hotpeft adapters add: {folder} is not a folder")
    handles = [open(folder / f, "rb") for f in UPLOADED if (folder / f).is_file()]
    try:
        files = [("files", (Path(h.name).name, h)) for h in handles]
        form = {"name": args.name, "description": args.description,
                "force_new_version": "true" if args.force_new_version else "false"}
        return client.post("/v1/adapters", data=form, files=files)
    finally:
        for h in handles:
            h.close()


def main(args: argparse.Namespace) -> int:
    import httpx

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        with httpx.Client(base_url=args.url, timeout=600, headers=headers) as client:
            response = _request(client, args)
    except httpx.HTTPError as e:
        print(f"hotpeft adapters: cannot reach {args.url}: {e}", file=sys.stderr)
        return 1
    try:
        body = response.json()
    except ValueError:
        body = {"error": {"message": response.text}}
    if response.is_error:
        message = body.get("error", {}).get("message", body) if isinstance(body, dict) else body
        hint = {401: " (pass an admin key with --api-key, or set HOTPEFT_API_KEY)",
                403: " (the key given with --api-key is not an admin key of this server)"}.get(response.status_code, "")
        print(f"hotpeft adapters {args.op}: {response.status_code}: {message}{hint}", file=sys.stderr)
        return 1
    print(json.dumps(body, indent=2) if args.json else views.render(args.op, body, getattr(args, "ref", None)))
    return 0
