"""What `hotpeft adapters` prints: a table or a sentence per answer, saying exactly what changed
(`--json` prints the server's answer instead)."""
from __future__ import annotations


def size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    return "\n".join(lines)


def _where(version: dict) -> str:
    where = version["residency"] + (", pinned" if version["pinned"] else "")
    if version.get("replicas"):
        where += " (" + ", ".join(f"{r}: {p}" for r, p in sorted(version["replicas"].items())) + ")"
    return where


def adapters_list(body: dict) -> str:
    rows = []
    for adapter in body["data"]:
        active = next(v for v in adapter["versions"] if v["version"] == adapter["active_version"])
        rows.append([adapter["name"], ",".join(str(v["version"]) for v in adapter["versions"]),
                     f"@{adapter['active_version']}", active["kind"], str(active["rank"] or "-"),
                     size(active["size_bytes"]), _where(active)])
    if not rows:
        out = "no adapters registered"
    else:
        out = table(["NAME", "VERSIONS", "ACTIVE", "KIND", "RANK", "SIZE", "RESIDENCY (active)"], rows)
    tiers = body.get("tiers")
    if tiers:
        out += (f"\n\ndevice tier: {size(tiers['device_bytes'])} of {size(tiers['max_device_bytes'])} "
                f"({tiers['device_adapters']} LoRA); cpu tier: {size(tiers['cpu_bytes'])} of "
                f"{size(tiers['max_cpu_bytes'])}")
    return out


def adapter(body: dict) -> str:
    rows = [[f"@{v['version']}" + (" *" if v["active"] else ""), v["kind"], str(v["rank"] or "-"), size(v["size_bytes"]),
             _where(v), v["source"], v["sha256"][:12], v["description"][:40]] for v in body["versions"]]
    return f"{body['name']} (active @{body['active_version']}, * below)\n" + table(
        ["VERSION", "KIND", "RANK", "SIZE", "RESIDENCY", "SOURCE", "SHA256", "DESCRIPTION"], rows)


def version(v: dict) -> str:
    fields = [("version", f"{v['name']}@{v['version']}" + (" (active)" if v["active"] else "")),
              ("kind", v["kind"]), ("rank", v["rank"]), ("alpha", v["alpha"]),
              ("targets", ", ".join(v["target_modules"] or []) or None),
              ("virtual tokens", v["num_virtual_tokens"]), ("size", size(v["size_bytes"])),
              ("residency", _where(v)), ("base", v["base_model"]), ("sha256", v["sha256"]),
              ("source", v["source"]), ("description", v["description"] or None),
              ("warnings", "; ".join(v["warnings"]) or None)]
    width = max(len(k) for k, _ in fields)
    return "\n".join(f"{k.ljust(width)}  {value}" for k, value in fields if value not in (None, ""))


def registered(v: dict) -> str:
    key = f"{v['name']}@{v['version']}"
    if v.get("unchanged"):
        return (f"unchanged: {key} already has this content (sha256 {v['sha256'][:12]}); it is the active version; "
                "add --force-new-version for a copy")
    what = v["kind"] + (f", rank {v['rank']}" if v["rank"] else "") + f", {size(v['size_bytes'])}"
    return f"registered {key} ({what}); it is the active version"


def deleted(body: dict) -> str:
    gone = ", ".join(f"{body['name']}@{n}" for n in body["versions"])
    active = body.get("active_version")
    return f"deleted {gone}; " + (f"active is now {body['name']}@{active}" if active else f"no version of "
                                                                                           f"{body['name']} is left")


def promoted(body: dict) -> str:
    return f"active is now {body['name']}@{body['active_version']}"


def residency(body: dict, op: str) -> str:
    key = f"{body['name']}@{body['version']}"
    if op == "load":
        state = body["residency"] + (", pinned" if body["pinned"] else "")
        return f"{key} is resident ({state})" + ("" if body["changed"] else "; it already was")
    return f"{key} unloaded (now {body['residency']})" if body["changed"] else f"{key} was not loaded (it is on " \
                                                                                f"{body['residency']})"


def render(op: str, body: dict, ref: str | None = None) -> str:
    if op == "list":
        return adapters_list(body)
    if op == "show":
        return version(body) if "@" in (ref or "") else adapter(body)
    if op in ("add", "merge"):
        return registered(body)
    if op == "rm":
        return deleted(body)
    if op == "promote":
        return promoted(body)
    return residency(body, op)
