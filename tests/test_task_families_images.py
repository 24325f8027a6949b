"""Image data loading (idx files, fsspec, gzip) and the mlp, cnn, autoencoder and logistic families.

The idx data sets are written here, tiny and random, with `task_zoo.images.write_idx`; nothing is
downloaded. The registry-wide contract (sampling, jit, shared compilation, spec errors) is in
tests/test_task_zoo.py.
"""

from __future__ import annotations

import gzip
import uuid

import fsspec
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from metaopt import task_zoo
from metaopt.task_zoo import TEST, TRAIN, TaskSpec
from metaopt.task_zoo.images import IDX_FILES, image_info, load_images, write_idx

NEW = ["mlp", "cnn", "autoencoder", "logistic"]


def _mnist_like(n_train: int = 64, n_test: int = 16, size: int = 28, seed: int = 0) -> dict[str, bytes]:
    """{file name: idx bytes} of a random MNIST-format data set (labels 0..9)."""
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images_name, labels_name = IDX_FILES[split]
        out[images_name] = write_idx(rng.integers(0, 256, (n, size, size), dtype=np.uint8))
        out[labels_name] = write_idx(np.arange(n, dtype=np.uint8) % 10)
    return out


def _write_dir(tmp_path, files: dict[str, bytes], gz: bool = False) -> str:
    for name, data in files.items():
        (tmp_path / (name + ".gz" if gz else name)).write_bytes(gzip.compress(data) if gz else data)
    return str(tmp_path)


def test_idx_local_and_file_uri(tmp_path):
    root = _write_dir(tmp_path, _mnist_like())
    for dataset in (f"idx:{root}", f"idx:file://{root}"):
        data = load_images(dataset)
        assert data.train_x.shape == (64, 784) and data.test_x.shape == (16, 784)
        assert data.train_x.dtype == jnp.float32 and data.train_y.dtype == jnp.int32
        assert 0.0 <= float(data.train_x.min()) and float(data.train_x.max()) <= 1.0
        assert data.shape == (28, 28, 1) and data.num_classes == 10
        assert image_info(dataset) == ((28, 28, 1), 10)
        np.testing.assert_array_equal(data.test_y, np.arange(16) % 10)
    assert load_images(f"idx:{root}") is load_images(f"idx:{root}")  # cached per process


def test_idx_memory_uri_and_gzip():
    root = f"/mnist-{uuid.uuid4().hex}"
    fs = fsspec.filesystem("memory")
    files = _mnist_like(n_train=20, n_test=10, size=6, seed=1)
    for name, data in files.items():  # a mix of plain and gzipped files, as MNIST mirrors ship
        zipped = "images" in name
        fs.pipe(f"{root}/{name}.gz" if zipped else f"{root}/{name}", gzip.compress(data) if zipped else data)
    dataset = f"idx:memory://{root}"
    data = load_images(dataset)
    assert data.train_x.shape == (20, 36) and data.shape == (6, 6, 1)
    raw = np.frombuffer(files["train-images-idx3-ubyte"][16:], np.uint8).reshape(20, 36)
    np.testing.assert_allclose(data.train_x, raw / 255.0, rtol=1e-6)
    assert image_info(dataset) == ((6, 6, 1), 10)
    # every image family trains on it; cost agrees with the real parameter count
    for name, kwargs in [
        ("mlp", {"width": 8, "depth": 1, "activation": "relu"}),
        ("cnn", {"channels": 4, "depth": 2, "downsample": "max", "activation": "relu"}),
        ("autoencoder", {"width": 8, "depth": 1, "bottleneck": 2, "activation": "tanh"}),
    ]:
        spec = TaskSpec(name, {**kwargs, "batch_size": 4, "seed": 0, "dataset": dataset})
        t = task_zoo.task(spec)
        # shapes only (no compiles: the suite in test_task_zoo.py runs the numbers)
        params = jax.eval_shape(t.init, jax.random.key(0))
        batch = jax.eval_shape(lambda k, t=t: t.batch(k, TRAIN), jax.random.key(1))
        assert jax.eval_shape(t.loss, params, jax.random.key(2), batch).shape == ()
        assert task_zoo.family(name).cost(spec).parameters == sum(p.size for p in jax.tree.leaves(params))


@pytest.mark.parametrize(
    "corrupt, error, match",
    [
        (lambda d: b"\x01\x02" + d[2:], ValueError, "train-images-idx3-ubyte: bad idx magic"),
        (lambda d: d[:2] + b"\x0d" + d[3:], ValueError, "train-images-idx3-ubyte: idx type code 0x0d"),
        (lambda d: d[:-5], ValueError, r"train-images-idx3-ubyte: idx dims \(64, 28, 28\) need 50176"),
        (lambda d: d[:10], ValueError, "train-images-idx3-ubyte: idx header declares 3 dims"),
        (None, FileNotFoundError, "neither .*train-images-idx3-ubyte nor .*train-images-idx3-ubyte.gz"),
    ],
)
def test_idx_errors_name_the_file(tmp_path, corrupt, error, match):
    files = _mnist_like()
    name = "train-images-idx3-ubyte"
    if corrupt is None:
        del files[name]
    else:
        files[name] = corrupt(files[name])
    root = _write_dir(tmp_path, files)
    with pytest.raises(error, match=match):
        load_images(f"idx:{root}")


def test_idx_mismatched_labels_and_bad_gzip(tmp_path):
    files = _mnist_like()
    files["t10k-labels-idx1-ubyte"] = write_idx(np.zeros(3, np.uint8))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with pytest.raises(ValueError, match="test has 16 images but 3 labels"):
        load_images(f"idx:{_write_dir(tmp_path / 'a', files)}")
    root = _write_dir(tmp_path / "b", _mnist_like(), gz=True)
    (tmp_path / "b" / "train-labels-idx1-ubyte.gz").write_bytes(b"not gzip")
    with pytest.raises(ValueError, match="train-labels-idx1-ubyte.gz: not a valid gzip"):
        load_images(f"idx:{root}")


def test_bad_settings_and_specs():
    with pytest.raises(ValueError, match="image dataset must be"):
        task_zoo.family("mlp", datasets=("mnist",))
    with pytest.raises(ValueError, match="datasets must be a non-empty sequence"):
        task_zoo.family("cnn", datasets="digits")
    with pytest.raises(ValueError, match="downsamples"):
        task_zoo.family("cnn", downsamples=("median",))
    with pytest.raises(ValueError, match="init_scales"):
        task_zoo.family("autoencoder", init_scales=(0.0, 1.0))
    with pytest.raises(ValueError, match="balance"):
        task_zoo.family("logistic", balance=(0.5, 2.0))
    with pytest.raises(ValueError, match="datasets must be drawn from"):
        task_zoo.family("logistic", datasets=("titanic",))
    real = TaskSpec("logistic", {"dataset": "iris", "batch_size": 8, "seed": 0, "n_features": 3})
    with pytest.raises(ValueError, match="apply to dataset 'synthetic' only"):
        task_zoo.task(real)
    bad = TaskSpec(
        "cnn",
        {
            "channels": 4,
            "depth": 1,
            "downsample": "none",
            "activation": "relu",
            "batch_size": 8,
            "seed": 0,
            "dataset": "cifar",
        },
    )
    with pytest.raises(ValueError, match="bad task spec.*image dataset must be"):
        task_zoo.task(bad)


def test_old_mlp_specs_keep_their_defaults():
    old = TaskSpec("mlp", {"width": 8, "depth": 1, "activation": "relu", "batch_size": 8, "seed": 0})
    t = task_zoo.task(old)
    assert float(t.init_scale) == 1.0 and t.train_x.shape == (1500, 64) and t.num_classes == 10


def _small_large(name: str) -> tuple[TaskSpec, TaskSpec]:
    if name == "logistic":
        base = {"dataset": "synthetic", "seed": 0}
        return (
            TaskSpec(name, {**base, "batch_size": 16, "n_features": 4, "n_classes": 2}),
            TaskSpec(name, {**base, "batch_size": 64, "n_features": 32, "n_classes": 5}),
        )
    small = {"batch_size": 16, "seed": 0, "activation": "relu", "depth": 1}
    big = {**small, "batch_size": 128, "depth": 2}
    extra = {
        "mlp": ({"width": 8}, {"width": 64}),
        "cnn": ({"channels": 4, "downsample": "max"}, {"channels": 16, "downsample": "none"}),
        "autoencoder": ({"width": 8, "bottleneck": 2}, {"width": 64, "bottleneck": 16}),
    }[name]
    return TaskSpec(name, {**small, **extra[0]}), TaskSpec(name, {**big, **extra[1]})


@pytest.mark.parametrize("name", NEW)
def test_cost_orders_specs_and_counts_parameters_exactly(name):
    fam = task_zoo.family(name)
    assert isinstance(fam.description, str) and "\n" not in fam.description
    small, large = _small_large(name)
    c_small, c_large = fam.cost(small), fam.cost(large)
    assert c_small.parameters < c_large.parameters and c_small.flops_per_step < c_large.flops_per_step
    specs = [small, large] + [fam.sample(jax.random.key(i)) for i in range(6)]
    for spec in specs:
        params = jax.eval_shape(task_zoo.task(spec).init, jax.random.key(0))  # shapes, no compile
        assert fam.cost(spec).parameters == sum(p.size for p in jax.tree.leaves(params)), spec


def _adam(task, steps: int, lr: float):
    """(test loss before, after, test accuracy before, after) of `steps` adam steps (jit+scan)."""
    opt = optax.adam(lr)

    @jax.jit
    def run(task, key):
        params = task.init(key)

        def step(carry, k):
            p, s = carry
            g = jax.grad(task.loss)(p, k, task.batch(k, TRAIN))
            u, s = opt.update(g, s, p)
            return (optax.apply_updates(p, u), s), None

        (final, _), _ = jax.lax.scan(step, (params, opt.init(params)), jax.random.split(key, steps))
        test = task.full(TEST) if hasattr(task, "full") else {"x": task.test_x}
        accuracy = getattr(task, "accuracy", lambda p, b: jnp.float32(0))
        return (
            task.loss(params, key, test),
            task.loss(final, key, test),
            accuracy(params, test),
            accuracy(final, test),
        )

    return [float(v) for v in run(task, jax.random.key(0))]


@pytest.mark.parametrize(
    "spec, min_accuracy",
    [
        (
            TaskSpec(
                "mlp",
                {
                    "width": 32,
                    "depth": 1,
                    "activation": "tanh",
                    "batch_size": 32,
                    "seed": 0,
                    "init_scale": 0.7,
                    "dataset": "digits",
                },
            ),
            0.85,
        ),
        (
            TaskSpec(
                "cnn",
                {
                    "channels": 8,
                    "depth": 1,
                    "downsample": "max",
                    "activation": "relu",
                    "batch_size": 32,
                    "seed": 0,
                },
            ),
            0.85,
        ),
        (
            TaskSpec(
                "autoencoder",
                {"width": 32, "depth": 1, "bottleneck": 8, "activation": "relu", "batch_size": 32, "seed": 0},
            ),
            None,
        ),
        (TaskSpec("logistic", {"dataset": "breast_cancer", "batch_size": 32, "seed": 0, "l2": 1e-3}), 0.9),
        (
            TaskSpec(
                "logistic",
                {
                    "dataset": "synthetic",
                    "batch_size": 32,
                    "seed": 3,
                    "n_classes": 3,
                    "n_features": 8,
                    "separation": 8.0,
                },
            ),
            0.7,
        ),
    ],
    ids=["mlp", "cnn", "autoencoder", "logistic-real", "logistic-synthetic"],
)
def test_adam_reduces_test_loss(spec, min_accuracy):
    before, after, acc_before, acc_after = _adam(task_zoo.task(spec), steps=300, lr=1e-2)
    assert after < 0.7 * before, (before, after)
    if min_accuracy is not None:
        assert acc_after > min_accuracy and acc_after > acc_before + 0.2, (acc_before, acc_after)


def test_logistic_synthetic_data_follow_the_spec():
    base = {"dataset": "synthetic", "batch_size": 8, "seed": 5, "n_samples": 2000, "n_classes": 2}
    t1, t2 = (task_zoo.task(TaskSpec("logistic", base)) for _ in range(2))
    jax.tree.map(np.testing.assert_array_equal, t1, t2)  # deterministic from the seed
    assert t1.train_x.shape == (1600, 16) and t1.test_x.shape == (400, 16)
    np.testing.assert_allclose(t1.train_x.mean(0), 0.0, atol=1e-5)  # standardised on train
    skewed = task_zoo.task(TaskSpec("logistic", {**base, "balance": 0.2}))
    # the prior of class 1 drops from 1/2 to 0.2 / 1.2: the positives thin out markedly
    assert float(skewed.train_y.mean()) < float(t1.train_y.mean()) - 0.1
    multi = task_zoo.task(TaskSpec("logistic", {**base, "n_classes": 4}))
    assert jax.eval_shape(multi.init, jax.random.key(0))["layer_0"]["w"].shape == (16, 4)
    assert jax.eval_shape(t1.init, jax.random.key(0))["layer_0"]["w"].shape == (16, 1)  # binary
