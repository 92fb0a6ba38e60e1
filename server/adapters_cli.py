"""`hotpeft adapters ...`: the admin API from the shell. Talks to a running server over HTTP.

    hotpeft adapters list
    hotpeft adapters show NAME[@N]
    hotpeft adapters add NAME FOLDER [--description TEXT] [--by-path]
    hotpeft adapters rm NAME[@N]
    hotpeft adapters load NAME [--version N] [--pin]
    hotpeft adapters unload NAME [--version N]
    hotpeft adapters promote NAME VERSION
    hotpeft adapters merge NAME SOURCE=WEIGHT ... [--strategy S] [--density D]

Prints the server's JSON answer; on an error prints its message and exits 1.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

UPLOADED = ("adapter_config.json", "adapter_model.safetensors", "chat_template.jinja", "tokenizer_config.json")
STRATEGIES = ("linear", "cat", "svd", "ties", "dare_linear", "dare_ties")


def add_parser(sub) -> None:
    p = sub.add_parser("adapters", help="list, add, remove, load, promote and merge adapters on a running server",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=os.environ.get("HOTPEFT_URL", "http://127.0.0.1:8000"),
                   help="the server (env HOTPEFT_URL; default http://127.0.0.1:8000)")
    ops = p.add_subparsers(dest="op", metavar="OP", required=True)
    ops.add_parser("list", help="every adapter, its versions and where each is resident")
    show = ops.add_parser("show", help="one adapter (NAME) or one version (NAME@N)")
    show.add_argument("ref")
    add = ops.add_parser("add", help="register FOLDER (a PEFT adapter folder) as a new version of NAME")
    add.add_argument("name")
    add.add_argument("folder")
    add.add_argument("--description", default="")
    add.add_argument("--by-path", action="store_true",
                     help="send the folder's path instead of its files (it must be under the server's --import-root)")
    rm = ops.add_parser("rm", help="delete NAME (every version) or NAME@N")
    rm.add_argument("ref")
    for op, what in (("load", "make resident in the engine"), ("unload", "drop to disk")):
        q = ops.add_parser(op, help=what)
        q.add_argument("name")
        q.add_argument("--version", type=int)
        if op == "load":
            q.add_argument("--pin", action="store_true", help="never evict it")
    promote = ops.add_parser("promote", help="make VERSION the active one (roll back or forward)")
    promote.add_argument("name")
    promote.add_argument("version", type=int)
    merge = ops.add_parser("merge", help="register a weighted combination of LoRA adapters as NAME")
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
                                                 "description": args.description})
    if not folder.is_dir():
        raise SystemExit(f"hotpeft adapters add: {folder} is not a folder")
    handles = [open(folder / f, "rb") for f in UPLOADED if (folder / f).is_file()]
    try:
        files = [("files", (Path(h.name).name, h)) for h in handles]
        return client.post("/v1/adapters", data={"name": args.name, "description": args.description}, files=files)
    finally:
        for h in handles:
            h.close()


def main(args: argparse.Namespace) -> int:
    import httpx

    try:
        with httpx.Client(base_url=args.url, timeout=600) as client:
            response = _request(client, args)
    except httpx.HTTPError as e:
        print(f"hotpeft adapters: cannot reach {args.url}: {e}", file=sys.stderr)
        return 1
    try:
        body = response.json()
    except ValueError:
        body = {"error": {"message": response.text}}
    if response.is_error:
        print(f"hotpeft adapters {args.op}: {response.status_code}: {body.get('error', {}).get('message', body)}",
              file=sys.stderr)
        return 1
    print(json.dumps(body, indent=2))
    return 0
