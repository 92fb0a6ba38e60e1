"""Registry (SQLite and a real PostgreSQL), content-addressed store and catalogue, without a server."""
from __future__ import annotations

import hashlib
import json
import shutil
import threading

import pytest
import torch

from hotpeft.adapters import (
    AdapterCatalog, AdapterIncompatible, AdapterInvalid, AdapterNotFound, AdapterRegistry, AdapterStore,
    AdapterUnavailable, BaseSpec,
)
from hotpeft.model.arch import Architecture

import tiny

FINGERPRINT = "tiny-llama:test"


@pytest.fixture(scope="module")
def spec():
    model = tiny.make_model()
    return BaseSpec.of(tiny.TINY_ID, Architecture.from_config(model.config))


@pytest.fixture(params=["sqlite", "postgresql"])
def registry_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'registry.db'}"
    return request.getfixturevalue("postgres_server")()


@pytest.fixture
def make_catalog(spec, tmp_path, registry_url):
    made = []

    def _make(**kw) -> AdapterCatalog:
        cat = AdapterCatalog(AdapterRegistry(registry_url), AdapterStore(tmp_path / "store"), spec,
                             kw.pop("fingerprint", FINGERPRINT), max_lora_rank=64, **kw)
        made.append(cat)
        return cat

    yield _make
    for cat in made:
        cat.close()


def test_catalog_resolves_names_versions_and_base(make_catalog, tiny_dirs):
    cat = make_catalog()
    v1 = cat.register_dir("a", tiny_dirs["adapters"] / "lora-attn", source="import")
    v2 = cat.register_dir("a", tiny_dirs["adapters"] / "lora-mlp", source="import")
    assert (v1.version, v2.version) == (1, 2)
    assert cat.resolve("a").record == v2 and cat.resolve("a@1").record == v1
    assert cat.resolve("base").record is None and cat.resolve(tiny.TINY_ID).record is None
    with pytest.raises(AdapterNotFound, match="adapter 'a' has no version 3; versions: 1, 2"):
        cat.resolve("a@3")
    with pytest.raises(AdapterNotFound, match=r"The model 'zzz' does not exist. Available: tiny-llama, a"):
        cat.resolve("zzz")


def test_a_version_records_every_field(make_catalog, tiny_dirs):
    cat = make_catalog()
    folder = tiny_dirs["adapters"] / "lora-mlp"
    r = cat.register_dir("m", folder, source="import", description="all linear", metrics={"loss": 1.5})
    assert (r.name, r.version, r.kind, r.rank, r.alpha) == ("m", 1, "lora", 16, 32.0)
    assert r.target_modules == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert r.sha256 == hashlib.sha256((folder / "adapter_model.safetensors").read_bytes()).hexdigest()
    assert r.size_bytes >= (folder / "adapter_model.safetensors").stat().st_size
    assert (r.base_model, r.base_fingerprint, r.source) == (tiny.TINY_ID, FINGERPRINT, "import")
    assert (r.description, r.metrics, r.num_virtual_tokens) == ("all linear", {"loss": 1.5}, None)
    s = cat.register_dir("s", tiny_dirs["adapters"] / "soft", source="upload")
    assert (s.kind, s.num_virtual_tokens, s.rank, s.target_modules) == ("prompt_tuning", 6, None, None)
    # the same from a fresh process's point of view
    again = make_catalog()
    assert again.resolve("m").record == r


def test_store_is_content_addressed_and_checked_on_load(make_catalog, tiny_dirs, tmp_path):
    cat = make_catalog()
    a = cat.register_dir("a", tiny_dirs["adapters"] / "lora-attn", source="import")
    b = cat.register_dir("b", tiny_dirs["adapters"] / "lora-attn", source="import")
    assert a.store_key == b.store_key and cat.store.keys() == [a.store_key]
    manifest = json.loads((cat.store.path(a.store_key) / "manifest.json").read_text())
    assert manifest["files"]["adapter_model.safetensors"] == a.sha256 and manifest["kind"] == "lora"
    cat.cache.drop(a.key)
    weights = cat.store.path(a.store_key) / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(AdapterUnavailable, match=r"adapter a@1 cannot be served: .* are corrupt"):
        cat.load(a)
    # Registering the same content again repairs the damaged object instead of pointing at it.
    c = cat.register_dir("c", tiny_dirs["adapters"] / "lora-attn", source="import")
    assert c.store_key == a.store_key
    cat.load(c)
    cat.cache.drop(a.key)
    cat.load(a)


def test_stored_weights_untouched_since_their_check_are_not_hashed_again(make_catalog, tiny_dirs, monkeypatch):
    import hotpeft.adapters.store as store_mod

    cat = make_catalog()
    a = cat.register_dir("a", tiny_dirs["adapters"] / "lora-attn", source="import")
    hashed = []
    real = store_mod.file_sha256
    monkeypatch.setattr(store_mod, "file_sha256", lambda p: hashed.append(p.name) or real(p))
    assert cat.store.checked_folder(a.store_key, a.sha256)[1] is True  # hashed when stored, untouched since
    assert hashed == []
    weights = cat.store.path(a.store_key) / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes())  # the same bytes, written again: its stat changed
    assert cat.store.checked_folder(a.store_key, a.sha256)[1] is False and len(hashed) == 1
    # a stat younger than RACY_S is not recorded (a rewrite within one timestamp tick could keep it)
    assert cat.store.checked_folder(a.store_key, a.sha256)[1] is False and len(hashed) == 2
    monkeypatch.setattr(store_mod, "RACY_S", 0.0)  # as if seconds had passed
    assert cat.store.checked_folder(a.store_key, a.sha256)[1] is False and len(hashed) == 3
    assert cat.store.checked_folder(a.store_key, a.sha256)[1] is True and len(hashed) == 3
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(AdapterUnavailable, match="corrupt"):
        cat.store.checked_folder(a.store_key, a.sha256)


def test_a_store_url_shares_objects_between_local_stores(spec, tiny_dirs, tmp_path):
    """Two processes with their own local stores and one registry: what one registers, the other
    fetches from the shared URL, checks, and serves; damage to the shared copy is caught."""
    from hotpeft.adapters.store import MirroredStore

    url = f"file://{tmp_path / 'bucket'}"
    registry = f"sqlite:///{tmp_path / 'registry.db'}"
    made = [AdapterCatalog(AdapterRegistry(registry), MirroredStore(tmp_path / f"local-{i}", url), spec, FINGERPRINT,
                           max_lora_rank=64) for i in range(2)]
    try:
        a, b = made
        record = a.register_dir("shared", tiny_dirs["adapters"] / "lora-mlp", source="import")
        remote = tmp_path / "bucket" / "objects" / record.store_key[:2] / record.store_key
        assert (remote / "manifest.json").is_file() and (remote / "adapter_model.safetensors").is_file()
        assert not b.store.path(record.store_key).exists()
        b.refresh()
        served = b.load(b.resolve("shared").record)
        assert b.store.path(record.store_key).is_dir()  # fetched into b's local store
        mine = a.load(record)
        assert mine.adapter.lora.keys() == served.adapter.lora.keys()
        assert all(torch.equal(mine.adapter.lora[k].B, served.adapter.lora[k].B) for k in mine.adapter.lora)
        # a damaged shared copy is not served: its content no longer matches its key
        b.cache.drop(record.key)
        shutil.rmtree(b.store.path(record.store_key))
        weights = remote / "adapter_model.safetensors"
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0xFF
        weights.write_bytes(bytes(data))
        with pytest.raises(AdapterUnavailable, match="holds other content"):
            b.load(record)
        # registering the same content again (anywhere) repairs the shared copy
        a.register_dir("again", tiny_dirs["adapters"] / "lora-mlp", source="import")
        assert b.load(record).key == record.key
    finally:
        for cat in made:
            cat.close()


def test_failed_registration_changes_nothing(make_catalog, tiny_dirs, tmp_path):
    cat = make_catalog()
    cat.register_dir("a", tiny_dirs["adapters"] / "lora-attn", source="import")
    before = (cat.registry.snapshot().versions, sorted(cat.store.keys()))
    bad = shutil.copytree(tiny_dirs["adapters"] / "lora-mlp", tmp_path / "bad")
    cfg = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps(cfg | {"use_dora": True}))
    with pytest.raises(AdapterInvalid):
        cat.register_dir("a", bad, source="import")
    assert (cat.registry.snapshot().versions, sorted(cat.store.keys())) == before
    assert not any(cat.store.staging_root.iterdir())


def test_promote_delete_and_numbers_never_reused(make_catalog, tiny_dirs):
    cat = make_catalog()
    folders = [tiny_dirs["adapters"] / n for n in ("lora-attn", "lora-mlp", "lora-tmpl")]
    for f in folders:
        cat.register_dir("a", f, source="import")
    assert cat.resolve("a").record.version == 3
    cat.promote("a", 1)
    assert cat.resolve("a").record.version == 1
    with pytest.raises(AdapterNotFound, match="no version 9"):
        cat.promote("a", 9)
    assert [r.version for r in cat.delete("a", 1)] == [1]
    assert cat.resolve("a").record.version == 3  # the active one went: the newest left takes over
    assert [r.version for r in cat.delete("a")] == [2, 3]
    with pytest.raises(AdapterNotFound):
        cat.resolve("a")
    with pytest.raises(AdapterNotFound, match="does not exist"):
        cat.delete("a")
    again = cat.register_dir("a", folders[0], source="import")
    assert again.version == 4  # `a@1` never names other weights than it did


def test_concurrent_registrations_of_one_name_become_consecutive_versions(make_catalog, tiny_dirs):
    cats = [make_catalog(), make_catalog()]  # two registries = two connections pools, as two processes
    errors, records = [], []

    def worker(cat, folder):
        try:
            for _ in range(4):
                records.append(cat.register_dir("race", folder, source="upload"))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(c, tiny_dirs["adapters"] / f))
               for c, f in zip(cats, ("lora-attn", "lora-mlp"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    assert sorted(r.version for r in records) == list(range(1, 9))
    snap = cats[0].registry.snapshot()
    assert sorted(snap.versions["race"]) == list(range(1, 9))
    for r in records:  # every version wholly there: its row, and its object in the store
        assert snap.versions["race"][r.version] == r
        assert cats[0].load(r).adapter.kind == "lora"


def test_another_process_registration_is_seen_by_watch(make_catalog, tiny_dirs):
    serving, other = make_catalog(), make_catalog()
    seen = threading.Event()
    serving.watch(interval_s=0.05)
    other.register_dir("new", tiny_dirs["adapters"] / "lora-attn", source="training")
    for _ in range(200):
        if "new" in serving.snapshot.active:
            seen.set()
            break
        seen.wait(0.05)
    assert seen.is_set()
    assert serving.resolve("new").record.source == "training"


def test_a_version_for_another_base_is_refused(make_catalog, tiny_dirs):
    make_catalog(fingerprint="other-model:1234").register_dir("x", tiny_dirs["adapters"] / "lora-attn", source="import")
    with pytest.raises(AdapterIncompatible, match="registered for base other-model:1234"):
        make_catalog().resolve("x")


def test_cpu_tier_is_bounded_by_bytes_and_keeps_pinned(make_catalog, tiny_dirs):
    cat = make_catalog()
    small = cat.register_dir("small", tiny_dirs["adapters"] / "lora-attn", source="import")
    big = cat.register_dir("big", tiny_dirs["adapters"] / "lora-mlp", source="import")
    sizes = {r.key: cat.load(r).adapter.nbytes for r in (small, big)}
    cat.cache.max_bytes = sizes[big.key] + sizes[small.key] // 2
    for r in (small, big):
        cat.cache.drop(r.key)
    cat.cache.pin(small.key, cat.load(small).adapter)
    assert cat.load(big).adapter.nbytes == sizes[big.key]  # handed over, but no room beside the pinned one
    assert cat.cache.keys() == {small.key} and cat.cache.nbytes() <= cat.cache.max_bytes
    cat.cache.unpin(small.key)
    cat.load(big)
    assert cat.cache.keys() == {big.key}
