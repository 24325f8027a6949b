"""Tests for metaopt.registry: publish, resolve, pull, load, and tamper detection."""

from __future__ import annotations

import json

import numpy as np
import pytest

from metaopt import registry
from metaopt.storage import CorruptArtifactError, read_committed

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


def test_pull_copies_and_verifies(reg, tmp_path, monkeypatch):
    _publish(reg)
    _publish(reg, theta={"w": np.ones(2, np.float32)})
    monkeypatch.setenv("METAOPT_REGISTRY_CACHE", str(tmp_path / "cache"))
    path = registry.pull("my-opt", reg)
    assert path == str(tmp_path / "cache" / "my-opt" / "2")
    # The cache is itself a registry, so it can be loaded offline.
    loaded = registry.load("my-opt:2", str(tmp_path / "cache"))
    assert loaded.theta["w"].tolist() == [1.0, 1.0]
    dest = str(tmp_path / "elsewhere")
    assert registry.pull("my-opt:1", reg, dest) == dest
    assert set(read_committed(dest)[0]) == {"theta.safetensors", "manifest.json"}
    # A damaged cached copy is replaced on the next pull.
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
    from metaopt.storage import write_committed

    reg = str(tmp_path)
    _publish(reg)
    files, meta = read_committed(f"{reg}/my-opt/1")
    m = json.loads(files["manifest.json"])
    m["theta_structure"][0]["shape"] = [99]
    files["manifest.json"] = json.dumps(m).encode()
    write_committed(f"{reg}/my-opt/1", files, meta, overwrite=True)
    with pytest.raises(CorruptArtifactError, match="manifest.json says"):
        registry.load("my-opt:1", reg)


def test_load_real_optimizer_runs_one_update(reg):
    optimizers = pytest.importorskip("metaopt.optimizers")
    if not hasattr(optimizers, "make"):
        pytest.skip("metaopt.optimizers.make is not available yet")
    import jax
    import jax.numpy as jnp
    import optax

    opt = optimizers.make("adam")
    theta = opt.init(jax.random.key(0))
    ref = registry.publish(reg, "adam-ref", opt.name, opt.hparams, theta, PROV)
    trained = registry.load(ref, reg)
    assert (trained.name, trained.version, trained.optimizer_name) == ("adam-ref", 1, opt.name)
    tx = trained.as_optax(num_steps=10)
    assert isinstance(tx, optax.GradientTransformationExtraArgs)
    params = {"w": jnp.ones(3)}
    state = tx.init(params)
    updates, _ = tx.update({"w": jnp.ones(3)}, state, params, loss=jnp.float32(1.0))
    new = optax.apply_updates(params, updates)
    assert np.all(np.asarray(new["w"]) < 1.0)


def test_as_optax_rebuilds_optimizer_from_manifest(tmp_path, monkeypatch):
    """Independent of the real optimizers: make() gets the hparams and θ arrives as jax arrays."""
    import sys
    import types

    import jax
    import optax

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
    assert registry.aliases(registry_uri, "opt") == {}
    registry.set_alias(registry_uri, "opt", 1, "champion")
    assert registry.resolve(registry_uri, "opt@champion") == ("opt", 1)
    assert registry.load("opt@champion", registry=registry_uri).version == 1
    registry.set_alias(registry_uri, "opt", 2, "champion")  # aliases move
    assert registry.resolve(registry_uri, "opt@champion") == ("opt", 2)
    assert registry.list_versions(registry_uri, "opt") == [1, 2]  # versions stay
    with pytest.raises(LookupError, match="no alias 'best'.*champion"):
        registry.resolve(registry_uri, "opt@best")
    with pytest.raises(LookupError, match="available versions"):
        registry.set_alias(registry_uri, "opt", 9, "champion")
    for bad in ("3", "latest", "Bad Alias"):
        with pytest.raises(ValueError, match="invalid alias"):
            registry.set_alias(registry_uri, "opt", 1, bad)
    with pytest.raises(ValueError, match="NAME@ALIAS"):
        registry.parse_ref("opt@champion:2")
