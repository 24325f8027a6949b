"""Tests for metaopt.registry: publish, resolve, pull, load, and tamper detection."""

from __future__ import annotations

import json
import os
import shutil
import uuid

import fsspec
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from fsspec.core import url_to_fs

from metaopt import optimizers, registry
from metaopt.storage import CorruptArtifactError, read_committed, read_marker, write_committed

THETA = {"layer": {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.zeros(3, np.float32)}}
PROV = {"job_id": "job-1", "code_version": "abc123", "outer_steps": 10, "meta_loss": 0.5}


@pytest.fixture(params=["plain", "file_uri"])
def reg(request, tmp_path):
    root = tmp_path / "registry"
    return str(root) if request.param == "plain" else root.as_uri()


def _publish(reg, name="my-opt", theta=THETA):
    return registry.publish(reg, name, "small_fc", {"hidden": 4}, theta, PROV)


def test_publish_versions_and_resolve(reg):
    assert registry.list_names(reg) == [] and registry.list_versions(reg, "my-opt") == []
    assert _publish(reg) == "my-opt:1"
    assert _publish(reg) == "my-opt:2"
    _publish(reg, name="other")
    assert registry.list_versions(reg, "my-opt") == [1, 2]
    assert registry.list_names(reg) == ["my-opt", "other"]
    assert registry.resolve(reg, "my-opt") == ("my-opt", 2)
    assert registry.resolve(reg, "my-opt:latest") == ("my-opt", 2)
    assert registry.resolve(reg, "my-opt:1") == ("my-opt", 1)
    with pytest.raises(registry.ArtifactNotFoundError, match=r"available versions: \[1, 2\]"):
        registry.resolve(reg, "my-opt:3")
    with pytest.raises(registry.ArtifactNotFoundError, match="my-opt"):
        registry.resolve(reg, "missing")


def test_manifest_contents(reg, tmp_path):
    _publish(reg)
    files, _ = read_committed(f"{reg}/my-opt/1")
    m = json.loads(files["manifest.json"])
    assert m["name"] == "my-opt" and m["version"] == 1
    assert m["optimizer"] == {"name": "small_fc", "hparams": {"hidden": 4}}
    assert m["provenance"] == PROV and m["created_at"]
    assert {s["path"] for s in m["theta_structure"]} == {"layer/w", "layer/b"}
    assert set(m["files"]) == {"theta.safetensors"}


def test_uncommitted_version_is_invisible_and_skipped(tmp_path):
    reg = str(tmp_path)
    _publish(reg)
    (tmp_path / "my-opt" / "2").mkdir()  # a publish that crashed before its marker
    assert registry.list_versions(reg, "my-opt") == [1]
    assert _publish(reg) == "my-opt:3"  # never reuses the crashed version's directory


def test_concurrent_publisher_fails_without_clobbering(tmp_path, monkeypatch):
    reg = str(tmp_path)
    _publish(reg)
    # A second publisher that computed the same version as a finished one (a lost race).
    monkeypatch.setattr(registry, "_numeric_dirs", lambda *_: [])
    with pytest.raises(FileExistsError, match="concurrently"):
        _publish(reg, theta={"w": np.ones(1, np.float32)})
    monkeypatch.undo()
    assert set(registry.load("my-opt:1", reg).theta) == {"layer"}


@pytest.mark.parametrize("name", ["", "My-Opt", "-x", "a b", "a/b", "a:b", "x" * 200])
def test_bad_names(tmp_path, name):
    with pytest.raises(ValueError, match="invalid optimizer name"):
        registry.publish(str(tmp_path), name, "adam", {}, {}, {})


@pytest.mark.parametrize("ref", ["", ":1", "a:", "a:0", "a:-1", "a:1.5", "a:1:2", "A:1", "a:v1"])
def test_bad_refs(ref):
    with pytest.raises(ValueError, match="accepted forms"):
        registry.parse_ref(ref)


def test_parse_ref():
    assert registry.parse_ref("my.opt_2") == ("my.opt_2", None)
    assert registry.parse_ref("a:12") == ("a", 12)
    assert registry.parse_ref("a@champion") == ("a", "champion")
    assert registry.parse_ref("a@sha256:" + "0f" * 32) == ("a", "sha256:" + "0f" * 32)


def test_pull_copies_and_verifies(reg, tmp_path, monkeypatch):
    _publish(reg)
    _publish(reg, theta={"w": np.ones(2, np.float32)})
    monkeypatch.setenv("METAOPT_REGISTRY_CACHE", str(tmp_path / "cache"))
    path = registry.pull("my-opt", reg)
    marker = read_marker(f"{reg}/my-opt/2")
    assert path == str(tmp_path / "cache" / "sha256" / registry.content_digest(marker["files"]))
    # What pull printed can be loaded offline.
    loaded = registry.load_path(path)
    assert loaded.ref == "my-opt:2" and loaded.theta["w"].tolist() == [1.0, 1.0]
    dest = str(tmp_path / "elsewhere")
    assert registry.pull("my-opt:1", reg, dest) == dest
    assert set(read_committed(dest)[0]) == {"theta.safetensors", "manifest.json"}
    # A damaged copy is replaced on the next pull.
    (tmp_path / "elsewhere" / "theta.safetensors").write_bytes(b"junk")
    registry.pull("my-opt:1", reg, dest)
    assert read_committed(dest)[0]["theta.safetensors"] != b"junk"


@pytest.mark.parametrize("fname", ["theta.safetensors", "manifest.json"])
@pytest.mark.parametrize("damage", ["tamper", "truncate"])
def test_tampering_is_detected(tmp_path, fname, damage):
    reg = str(tmp_path / "reg")
    _publish(reg)
    f = tmp_path / "reg" / "my-opt" / "1" / fname
    data = f.read_bytes()
    f.write_bytes(data[:-1] + bytes([data[-1] ^ 1]) if damage == "tamper" else data[:10])
    with pytest.raises(CorruptArtifactError, match=fname) as info:
        registry.load("my-opt:1", reg)
    assert "re-pull" in str(info.value) and "re-publish" in str(info.value)
    with pytest.raises(CorruptArtifactError, match=fname) as info:
        registry.pull("my-opt:1", reg, str(tmp_path / "dest"))
    assert "re-publish" in str(info.value)


def test_load_rejects_structure_mismatch(tmp_path):
    """Even with consistent hashes, θ must match the manifest's theta_structure."""
    reg = str(tmp_path)
    _publish(reg)
    files, meta = read_committed(f"{reg}/my-opt/1")
    m = json.loads(files["manifest.json"])
    m["theta_structure"][0]["shape"] = [99]
    files["manifest.json"] = json.dumps(m).encode()
    write_committed(f"{reg}/my-opt/1", files, meta, overwrite=True)
    with pytest.raises(CorruptArtifactError, match="manifest.json says"):
        registry.load("my-opt:1", reg)


def test_a_learned_optimizer_round_trips_theta_leaf_by_leaf_and_steps_alike(reg):
    """A real learned optimizer with a real, nonzero θ: every leaf comes back with its path,
    dtype and values, and the loaded optimizer's update is the original's."""
    opt = optimizers.make("small_fc", hidden=8, hidden_layers=1)
    # θ as after training: its init moved by a random step, so a loader that rebuilt θ from the
    # hyperparameters, or mixed up two leaves of one shape, would not give it back.
    leaves, treedef = jax.tree.flatten(opt.init(jax.random.key(0)))
    moves = [0.1 * jax.random.normal(k, leaf.shape, leaf.dtype)
             for k, leaf in zip(jax.random.split(jax.random.key(1), len(leaves)), leaves, strict=True)]
    theta = jax.tree.unflatten(treedef, [np.asarray(a + b) for a, b in zip(leaves, moves, strict=True)])
    assert len(leaves) >= 4 and all(np.all(leaf != 0) for leaf in jax.tree.leaves(theta))

    ref = registry.publish(reg, "small-fc-ref", opt.name, opt.hparams, theta, PROV)
    trained = registry.load(ref, reg)
    assert (trained.name, trained.version, trained.optimizer_name) == ("small-fc-ref", 1, "small_fc")
    assert trained.hparams == opt.hparams
    got, want = (jax.tree_util.tree_leaves_with_path(t) for t in (trained.theta, theta))
    assert [path for path, _ in got] == [path for path, _ in want]
    for (path, loaded), (_, saved) in zip(got, want, strict=True):
        assert loaded.dtype == saved.dtype, path
        np.testing.assert_array_equal(loaded, saved, err_msg=jax.tree_util.keystr(path))

    params = {"w": jnp.linspace(-1.0, 1.0, 6).reshape(2, 3)}

    def update(tx: optax.GradientTransformationExtraArgs) -> np.ndarray:
        updates, _ = tx.update({"w": 0.3 * params["w"]}, tx.init(params), params, loss=jnp.float32(1.0))
        return np.asarray(updates["w"])

    loaded_update = update(trained.as_optax(num_steps=10))
    np.testing.assert_array_equal(loaded_update, update(opt.as_optax(jax.tree.map(jnp.asarray, theta), 10)))
    assert np.all(np.isfinite(loaded_update)) and np.any(loaded_update != 0)


def test_as_optax_rebuilds_optimizer_from_manifest(tmp_path, monkeypatch):
    """Independent of the real optimizers: make() gets the hparams and θ arrives as jax arrays."""
    import sys
    import types

    seen = {}

    class _Fake:
        def as_optax(self, theta, num_steps):
            seen.update(theta=theta, num_steps=num_steps)
            return optax.with_extra_args_support(optax.sgd(0.1))

    def make(name, **hparams):
        seen.update(name=name, hparams=hparams)
        return _Fake()

    monkeypatch.setitem(sys.modules, "metaopt.optimizers", types.SimpleNamespace(make=make))
    reg = str(tmp_path)
    _publish(reg)
    tx = registry.load("my-opt", reg).as_optax(num_steps=7)
    assert isinstance(tx, optax.GradientTransformationExtraArgs)
    assert seen["name"] == "small_fc" and seen["hparams"] == {"hidden": 4}
    assert seen["num_steps"] == 7 and isinstance(seen["theta"]["layer"]["w"], jax.Array)
    np.testing.assert_array_equal(seen["theta"]["layer"]["w"], THETA["layer"]["w"])


def test_pull_never_replaces_a_folder_that_is_not_an_artifact(tmp_path):
    registry_uri = str(tmp_path / "reg")
    registry.publish(registry_uri, "opt", "adam", {}, {}, {"job_id": "j"})
    project = tmp_path / "project"
    project.mkdir()
    (project / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="holds no pulled artifact"):
        registry.pull("opt", registry_uri, str(project))
    assert (project / "notes.txt").read_text() == "keep me"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert registry.pull("opt", registry_uri, str(empty)) == str(empty)  # an empty folder is fine
    assert registry.pull("opt", registry_uri, str(empty)) == str(empty)  # and so is re-pulling into it


def test_aliases_move_and_resolve(tmp_path):
    registry_uri = str(tmp_path / "reg")
    for _ in range(2):
        registry.publish(registry_uri, "opt", "adam", {}, {}, {"job_id": "j"})
    assert registry.aliases(registry_uri, "opt") == {"latest": 2}
    assert registry.set_alias(registry_uri, "opt", 1, "champion") is None
    assert registry.resolve(registry_uri, "opt@champion") == ("opt", 1)
    assert registry.load("opt@champion", registry=registry_uri).version == 1
    assert registry.set_alias(registry_uri, "opt", 2, "champion") == 1  # aliases move
    assert registry.resolve(registry_uri, "opt@champion") == ("opt", 2)
    assert registry.list_versions(registry_uri, "opt") == [1, 2]  # versions stay
    with pytest.raises(LookupError, match="no alias 'best'.*champion"):
        registry.resolve(registry_uri, "opt@best")
    with pytest.raises(LookupError, match="available versions"):
        registry.set_alias(registry_uri, "opt", 9, "champion")
    for bad in ("3", "Bad Alias", "a/b", ""):
        with pytest.raises(ValueError, match="invalid alias"):
            registry.set_alias(registry_uri, "opt", 1, bad)
    with pytest.raises(ValueError, match="moves by itself"):
        registry.set_alias(registry_uri, "opt", 1, "latest")
    with pytest.raises(LookupError, match="no published optimizer named 'nope'.*opt"):
        registry.set_alias(registry_uri, "nope", 1, "champion")
    with pytest.raises(ValueError, match="NAME@ALIAS"):
        registry.parse_ref("opt@champion:2")


# --- immutability ---------------------------------------------------------------------------


def _files(root, name, version) -> dict[str, bytes]:
    folder = root / name / str(version)
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_versions_are_immutable(tmp_path):
    root = tmp_path / "reg"
    assert _publish(str(root)) == "my-opt:1"
    before = _files(root, "my-opt", 1)
    assert _publish(str(root), theta={"w": np.ones(4, np.float32)}) == "my-opt:2"  # the next version
    assert _files(root, "my-opt", 1) == before  # every byte of v1, its COMMIT.json too
    assert registry.load("my-opt:1", str(root)).theta["layer"]["w"].tolist() == THETA["layer"]["w"].tolist()
    # Writing over an existing version is refused, whoever tries.
    with pytest.raises(FileExistsError, match="immutable"):
        write_committed(str(root / "my-opt" / "1"), {"theta.safetensors": b"x"}, {})
    assert _files(root, "my-opt", 1) == before


def test_a_publisher_that_lost_a_race_takes_the_next_version(tmp_path, monkeypatch):
    reg = str(tmp_path)
    _publish(reg)
    listings = iter([[]])  # its first listing is stale: it saw no version before the other's v1
    real = registry._numeric_dirs
    monkeypatch.setattr(registry, "_numeric_dirs", lambda *a: next(listings, None) or real(*a))
    assert _publish(reg, theta={"w": np.ones(1, np.float32)}) == "my-opt:2"
    assert set(registry.load("my-opt:1", reg).theta) == {"layer"}
    assert set(registry.load("my-opt:2", reg).theta) == {"w"}


# --- aliases --------------------------------------------------------------------------------


def test_latest_follows_every_publish_and_champion_moves_only_when_set(tmp_path):
    reg = str(tmp_path)
    assert _publish(reg) == "my-opt:1"
    assert registry.aliases(reg, "my-opt") == {"latest": 1}
    registry.set_alias(reg, "my-opt", 1, "champion")
    for version in (2, 3):
        assert _publish(reg) == f"my-opt:{version}"
        assert registry.aliases(reg, "my-opt") == {"latest": version, "champion": 1}
        assert registry.resolve(reg, "my-opt@latest") == ("my-opt", version)
        assert registry.resolve(reg, "my-opt") == ("my-opt", version)
        assert registry.resolve(reg, "my-opt@champion") == ("my-opt", 1)
    registry.set_alias(reg, "my-opt", 3, "champion")
    assert registry.resolve(reg, "my-opt@champion") == ("my-opt", 3)
    assert registry.load("my-opt@champion", reg).version == 3
    # An alias given at publish time moves with it; a bad one stops the publish before it starts.
    registry.publish(reg, "my-opt", "small_fc", {}, THETA, PROV, aliases=["champion", "candidate"])
    assert registry.aliases(reg, "my-opt") == {"latest": 4, "champion": 4, "candidate": 4}
    with pytest.raises(ValueError, match="moves by itself"):
        registry.publish(reg, "my-opt", "small_fc", {}, THETA, PROV, aliases=["latest"])
    assert registry.list_versions(reg, "my-opt") == [1, 2, 3, 4]
    pinned = registry.digest(reg, "my-opt", 4)
    assert json.loads((tmp_path / "my-opt" / "aliases.json").read_text()) == {
        "champion": {"version": 4, "digest": pinned}, "candidate": {"version": 4, "digest": pinned}}


# --- tampering ------------------------------------------------------------------------------


@pytest.mark.parametrize("fname", ["theta.safetensors", "manifest.json"])
def test_a_missing_file_is_named(tmp_path, fname):
    reg = str(tmp_path / "reg")
    _publish(reg)
    (tmp_path / "reg" / "my-opt" / "1" / fname).unlink()
    with pytest.raises(CorruptArtifactError, match=f"{fname} is missing"):
        registry.load("my-opt:1", reg)
    with pytest.raises(CorruptArtifactError, match=f"{fname} is missing"):
        registry.pull("my-opt:1", reg, str(tmp_path / "d"))


def test_swapped_theta_with_a_rewritten_marker_is_caught_by_the_manifest(tmp_path, monkeypatch):
    """Someone replaced θ and rewrote COMMIT.json to match: the manifest's sha256 still says no."""
    import safetensors.numpy

    monkeypatch.setenv("METAOPT_REGISTRY_CACHE", str(tmp_path / "cache"))
    reg = str(tmp_path / "reg")
    _publish(reg)
    files, meta = read_committed(f"{reg}/my-opt/1")
    files["theta.safetensors"] = safetensors.numpy.save({"layer/w": np.full((2, 3), 9, np.float32),
                                                         "layer/b": np.zeros(3, np.float32)})
    write_committed(f"{reg}/my-opt/1", files, meta, overwrite=True)
    with pytest.raises(CorruptArtifactError, match="theta.safetensors does not match the sha256 in manifest"):
        registry.load("my-opt:1", reg)
    with pytest.raises(CorruptArtifactError, match="theta.safetensors does not match"):
        registry.pull("my-opt:1", reg)
    assert not (tmp_path / "cache" / "sha256").exists() or not any((tmp_path / "cache" / "sha256").iterdir())


def _rewrite_consistently(uri: str) -> None:
    """Replace θ and rewrite the manifest's sha256 and COMMIT.json to match: every check inside
    the artifact passes, only a digest held outside it can tell."""
    import safetensors.numpy

    from metaopt.storage import sha256_hex

    files, meta = read_committed(uri)
    files["theta.safetensors"] = safetensors.numpy.save({"layer/w": np.full((2, 3), 9, np.float32),
                                                         "layer/b": np.zeros(3, np.float32)})
    manifest = json.loads(files["manifest.json"])
    manifest["files"]["theta.safetensors"]["sha256"] = sha256_hex(files["theta.safetensors"])
    files["manifest.json"] = json.dumps(manifest).encode()
    write_committed(uri, files, meta, overwrite=True)


def test_a_ref_pinned_by_digest_loads_that_content_and_refuses_a_consistent_rewrite(reg, tmp_path,
                                                                                      monkeypatch):
    monkeypatch.setenv("METAOPT_REGISTRY_CACHE", str(tmp_path / "cache"))
    _publish(reg)
    _publish(reg, theta={"w": np.ones(2, np.float32)})
    first, second = registry.digest(reg, "my-opt", 1), registry.digest(reg, "my-opt", 2)
    assert first != second and first.startswith("sha256:") and len(first) == 7 + 64
    assert registry.resolve(reg, f"my-opt@{first}") == ("my-opt", 1)
    w = registry.load(f"my-opt@{first}", reg).theta["layer"]["w"]
    np.testing.assert_array_equal(w, THETA["layer"]["w"])
    assert registry.load_path(registry.pull(f"my-opt@{second}", reg)).version == 2
    registry.set_alias(reg, "my-opt", 1, "champion")
    _rewrite_consistently(f"{reg}/my-opt/1")
    np.testing.assert_array_equal(registry.load("my-opt:1", reg).theta["layer"]["w"], 9)  # unpinned: passes
    with pytest.raises(registry.ArtifactNotFoundError, match=f"no version of 'my-opt'.*has digest {first}"):
        registry.load(f"my-opt@{first}", reg)
    with pytest.raises(registry.ArtifactNotFoundError, match=f"my-opt:2 {second}"):
        registry.pull(f"my-opt@{first}", reg)
    rewritten = registry.digest(reg, "my-opt", 1)
    for call in (registry.load, registry.pull):
        with pytest.raises(CorruptArtifactError, match=f"my-opt@champion was pinned to my-opt:1 with digest "
                                                       f"{first}, but my-opt:1 now has digest {rewritten}"):
            call("my-opt@champion", reg)


def test_an_alias_set_before_digests_existed_still_resolves(tmp_path):
    reg = str(tmp_path)
    _publish(reg)
    (tmp_path / "my-opt" / "aliases.json").write_text(json.dumps({"champion": 1}))
    assert registry.resolve(reg, "my-opt@champion") == ("my-opt", 1)
    assert registry.aliases(reg, "my-opt") == {"champion": 1, "latest": 1}
    registry.set_alias(reg, "my-opt", 1, "candidate")  # the old entry is kept as it was: no digest
    assert json.loads((tmp_path / "my-opt" / "aliases.json").read_text())["champion"] == {
        "version": 1, "digest": None}
    for alias in ("champion", "candidate"):
        assert registry.resolve(reg, f"my-opt@{alias}") == ("my-opt", 1)
    bad = {"champion": {"version": 1, "digest": "md5:0"}}
    (tmp_path / "my-opt" / "aliases.json").write_text(json.dumps(bad))
    with pytest.raises(CorruptArtifactError, match="aliases.json is unreadable.*not sha256:HEX"):
        registry.resolve(reg, "my-opt@champion")


@pytest.mark.parametrize("ref", ["my-opt@sha256:", "my-opt@sha256:abc", "my-opt@sha256:" + "A" * 64,
                                 "my-opt@sha256:" + "0" * 65, "@sha256:" + "0" * 64,
                                 "my-opt@md5:" + "0" * 32])
def test_a_bad_digest_ref_is_refused(ref):
    with pytest.raises(ValueError, match="accepted forms"):
        registry.parse_ref(ref)


def test_a_version_moved_under_another_number_is_refused(tmp_path):
    reg = tmp_path / "reg"
    _publish(str(reg))
    _publish(str(reg))
    (reg / "my-opt" / "2").rename(reg / "my-opt" / "old")
    (reg / "my-opt" / "1").rename(reg / "my-opt" / "2")
    with pytest.raises(CorruptArtifactError, match="describes my-opt:1, not my-opt:2"):
        registry.load("my-opt:2", str(reg))


# --- the cache ------------------------------------------------------------------------------


@pytest.fixture
def remote(tmp_path, monkeypatch):
    """A registry on fsspec's in-memory filesystem (a remote one as far as the registry can tell)
    and the cache in tmp_path."""
    monkeypatch.setenv("METAOPT_REGISTRY_CACHE", str(tmp_path / "cache"))
    root = f"memory://registry-tests-{uuid.uuid4().hex}"
    yield root
    fsspec.filesystem("memory").rm(root.removeprefix("memory://"), recursive=True)


def _remove(uri: str) -> None:
    fs, path = url_to_fs(uri)
    fs.rm_file(path)


def test_a_cache_hit_reads_only_the_commit_marker(remote, tmp_path):
    _publish(remote)
    first = registry.pull("my-opt:1", remote)
    assert first.startswith(str(tmp_path / "cache" / "sha256"))
    # Without θ or the manifest in the registry, only the cache can answer now.
    _remove(f"{remote}/my-opt/1/theta.safetensors")
    _remove(f"{remote}/my-opt/1/manifest.json")
    assert registry.pull("my-opt:1", remote) == first
    assert registry.pull("my-opt@latest", remote) == first
    dest = str(tmp_path / "dest")
    assert registry.pull("my-opt:1", remote, dest) == dest  # --dest is served from the cache too
    np.testing.assert_array_equal(registry.load_path(dest).theta["layer"]["w"], THETA["layer"]["w"])


def test_loading_from_a_remote_registry_downloads_once(remote, tmp_path):
    _publish(remote)
    assert registry.load("my-opt", remote).version == 1
    _remove(f"{remote}/my-opt/1/theta.safetensors")
    again = registry.load("my-opt", remote)  # from the cache
    np.testing.assert_array_equal(again.theta["layer"]["w"], THETA["layer"]["w"])
    # Another version is not in the cache: it is fetched, and the registry is still verified.
    _publish(remote, theta={"w": np.ones(2, np.float32)})
    assert registry.load("my-opt:2", remote).theta["w"].tolist() == [1.0, 1.0]
    _publish(remote)
    _remove(f"{remote}/my-opt/3/theta.safetensors")
    with pytest.raises(CorruptArtifactError, match="3/theta.safetensors is missing"):
        registry.load("my-opt:3", remote)


def test_a_damaged_cache_copy_is_repaired(remote):
    _publish(remote)
    path = registry.pull("my-opt:1", remote)
    theta_file = os.path.join(path, "theta.safetensors")
    good = open(theta_file, "rb").read()
    with open(theta_file, "wb") as f:
        f.write(good[:-1] + bytes([good[-1] ^ 1]))
    assert registry.pull("my-opt:1", remote) == path
    assert open(theta_file, "rb").read() == good
    os.remove(theta_file)
    assert registry.load("my-opt:1", remote).version == 1 and open(theta_file, "rb").read() == good
    # Damaged cache and damaged registry: nothing good to serve, and the error says where.
    os.remove(theta_file)
    _remove(f"{remote}/my-opt/1/theta.safetensors")
    with pytest.raises(CorruptArtifactError, match="my-opt/1/theta.safetensors is missing"):
        registry.pull("my-opt:1", remote)


def test_the_cache_is_keyed_by_content_not_by_name(tmp_path, monkeypatch):
    monkeypatch.setenv("METAOPT_REGISTRY_CACHE", str(tmp_path / "cache"))
    one, two = tmp_path / "one", tmp_path / "two"
    _publish(str(one))
    _publish(str(two), theta={"w": np.ones(3, np.float32)})  # the same my-opt:1, other content
    a, b = registry.pull("my-opt:1", str(one)), registry.pull("my-opt:1", str(two))
    assert a != b
    assert registry.load_path(a).theta["layer"]["b"].tolist() == [0, 0, 0]
    assert registry.load_path(b).theta["w"].tolist() == [1, 1, 1]
    mirror = tmp_path / "mirror"
    shutil.copytree(one, mirror)  # a copy of a registry holds the same artifact: stored once
    assert registry.pull("my-opt:1", str(mirror)) == a
    assert len(os.listdir(tmp_path / "cache" / "sha256")) == 2


def test_read_manifest_checks_it_against_the_commit_marker(tmp_path):
    reg = str(tmp_path)
    _publish(reg)
    assert registry.read_manifest(reg, "my-opt", 1)["provenance"] == PROV
    with pytest.raises(LookupError, match="my-opt:2 is not in"):
        registry.read_manifest(reg, "my-opt", 2)
    manifest = tmp_path / "my-opt" / "1" / "manifest.json"
    manifest.write_text(manifest.read_text().replace("job-1", "job-2"))
    with pytest.raises(CorruptArtifactError, match="manifest.json does not match"):
        registry.read_manifest(reg, "my-opt", 1)


def test_load_defaults_to_the_registry_in_the_environment(tmp_path, monkeypatch):
    _publish(str(tmp_path))
    monkeypatch.setenv("METAOPT_REGISTRY", str(tmp_path))
    assert registry.default_registry() == str(tmp_path) and registry.load("my-opt").version == 1
    monkeypatch.delenv("METAOPT_REGISTRY")
    assert registry.default_registry() == "runs/registry"
