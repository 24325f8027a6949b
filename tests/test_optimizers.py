"""Conformance suite run over every registered optimizer, plus optimizer-specific checks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from metaopt import optimizers

NAMES = optimizers.names()
# K-FAC, FOOF and MBF precondition with each layer's statistics, which gradients of these pytrees
# cannot give: tests/test_curvature.py runs the same checks on them with statistics.
GRADIENT_ONLY = [n for n in NAMES if not getattr(optimizers.make(n), "needs_layer_stats", False)]
# Every registered optimizer at its defaults, plus the non-default options a published optimizer
# uses (reference:4's per-tensor hypergradient rate; reference:5's and 6's element-wise gain, here
# with the rate held through a long warm-up and adapting at the schedule's pace too; the peak rate
# estimated as Prodigy's; features of a DMD of recent steps), for the checks
# every optimizer must pass.
# M-FAC's default window (1,024 gradients) solves a 1,024² system every step: seconds a test here.
# Its checks run at a window of 32, the same code path.
DEFAULTS = {"mfac": {"window": 32}}
CONFIGS = [(name, DEFAULTS.get(name, {})) for name in GRADIENT_ONLY] + [
    ("nominal_mlp", {"rate_adaptation": 0.1}),
    ("nominal_mlp", {"elementwise_correction": True, "rate_adaptation": 0.1, "warmup": 0.2,
                     "rate_after_warmup": True, "rate_on_schedule": True}),
    ("nominal_mlp", {"elementwise_correction": True, "warmup": 0.2, "learning_rate": 1.0,
                     "rate_estimate": 0.5}),
    ("nominal_mlp", {"rate_adaptation": 0.1, "dmd_history": 4})]
CONFIG_IDS = [name + "".join(f"-{k}={v}" for k, v in hp.items()) for name, hp in CONFIGS]


def _params():
    """A pytree with 0-D, 1-D, 2-D and 3-D leaves."""
    k = jax.random.split(jax.random.key(0), 4)
    return {
        "scalar": jax.random.normal(k[0], ()),
        "bias": jax.random.normal(k[1], (7,)),
        "dense": {"w": jax.random.normal(k[2], (6, 5))},
        "conv": jax.random.normal(k[3], (3, 4, 5)),
    }


def _setup(name, num_steps=100, hparams=None):
    opt = optimizers.make(name, **(hparams or {}))
    theta = opt.init(jax.random.key(1))
    tx = opt.as_optax(theta, num_steps)
    params = _params()
    return opt, theta, tx, params, tx.init(params)


def _structure(tree):
    return jax.tree.structure(tree), [(jnp.shape(x), jnp.result_type(x)) for x in jax.tree.leaves(tree)]


def test_names_and_protocol():
    assert NAMES == sorted(NAMES)
    assert {"adam", "small_fc"} <= set(NAMES)
    for name in NAMES:
        opt = optimizers.make(name)
        assert opt.name == name
        assert optimizers.make(name, **opt.hparams) == opt  # hparams rebuild the optimizer
        hash(opt)  # usable as a static jit argument


def test_make_errors_are_clear():
    with pytest.raises(ValueError, match="unknown optimizer 'nope'.*adam.*small_fc"):
        optimizers.make("nope")
    with pytest.raises(ValueError, match=r"\['hiden'\].*accepted.*hidden"):
        optimizers.make("small_fc", hiden=3)


@pytest.mark.parametrize("name", NAMES)
def test_theta_is_float32_dicts(name):
    opt = optimizers.make(name)
    theta = opt.init(jax.random.key(0))
    assert isinstance(theta, dict)
    for leaf in jax.tree.leaves(theta):
        assert leaf.dtype == jnp.float32


@pytest.mark.parametrize(("name", "hparams"), CONFIGS, ids=CONFIG_IDS)
def test_jit_no_recompile_and_stable_state(name, hparams):
    _, _, tx, params, state = _setup(name, hparams=hparams)
    update = jax.jit(tx.update)
    grads = jax.tree.map(jnp.ones_like, params)
    before = _structure(state)
    u, state = update(grads, state, params, loss=jnp.float32(1.0))
    assert _structure(state) == before
    u, state = update(grads, state, params, loss=jnp.float32(0.5))
    assert update._cache_size() == 1
    assert _structure(state) == before
    assert _structure(u) == _structure(params)


@pytest.mark.parametrize(("name", "hparams"), CONFIGS, ids=CONFIG_IDS)
def test_eager_steps_compile_once(name, hparams):
    """Stepped without jit (a notebook, a debugger), an optimizer compiles during its first step
    and never again for the same shapes: small_fc used to compile its two lax.maps afresh on every
    call, ~0.4 s a step against Adam's 1 ms. Counted by JAX's own events: a backend compile, or
    a program fetched from the persistent compilation cache (the tests share one), which would
    hide a compilation from the first."""
    _, _, tx, params, state = _setup(name, hparams=hparams)
    compiles = []

    def on_duration(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    def on_event(event, **kwargs):
        if event == "/jax/compilation_cache/cache_hits":
            compiles.append(event)

    grads = jax.tree.map(lambda x: 0.1 * x, params)
    u, state = tx.update(grads, state, params)  # the first step compiles what it needs
    params = optax.apply_updates(params, u)
    jax.monitoring.register_event_duration_secs_listener(on_duration)
    jax.monitoring.register_event_listener(on_event)
    try:
        for _ in range(5):
            u, state = tx.update(grads, state, params)
            params = optax.apply_updates(params, u)
        jax.block_until_ready(params)
    finally:
        jax.monitoring.unregister_event_duration_listener(on_duration)
        jax.monitoring.unregister_event_listener(on_event)
    assert compiles == [], f"{len(compiles)} compilations in 5 eager steps after the first: {compiles}"


@pytest.mark.parametrize(("name", "hparams"), CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("scale", [0.0, 1e-8, 1e8])
def test_finite_for_extreme_grads(name, hparams, scale):
    _, _, tx, params, state = _setup(name, hparams=hparams)
    update = jax.jit(tx.update)
    for i in range(4):
        grads = jax.tree.map(lambda x, i=i: scale * (x + i), params)
        u, state = update(grads, state, params)
        params = optax.apply_updates(params, u)
        for leaf in jax.tree.leaves((u, state, params)):
            assert np.all(np.isfinite(np.asarray(leaf))), (scale, i)


# M-FAC solves a system of condition up to ~1e5 (its float32 jitter's bound) in float32: batched
# and single programs round differently, by up to ~1e-4 relative.
VMAP_RTOL = {"mfac": 1e-3}


@pytest.mark.parametrize("name", GRADIENT_ONLY)
def test_vmap_over_theta_and_grads(name):
    """Batched θ and gradients (particles), as in vmapped inner training inside lax.scan."""
    opt = optimizers.make(name, **DEFAULTS.get(name, {}))
    thetas = jax.vmap(opt.init)(jax.random.split(jax.random.key(0), 3))
    scales = jnp.asarray([0.5, 1.0, 2.0])
    params = _params()

    @jax.jit
    def two_steps(theta, scale):
        tx = opt.as_optax(theta, 10)
        grads = jax.tree.map(lambda x: scale * jnp.cos(x), params)
        state = tx.init(params)
        _, state = tx.update(grads, state, params)
        return tx.update(grads, state, params)[0]

    batched = jax.vmap(two_steps)(thetas, scales)
    single = two_steps(jax.tree.map(lambda x: x[1], thetas), scales[1])
    for b, s in zip(jax.tree.leaves(batched), jax.tree.leaves(single), strict=True):
        assert b.shape[0] == 3
        np.testing.assert_allclose(b[1], s, rtol=VMAP_RTOL.get(name, 1e-5), atol=1e-8)


@pytest.mark.parametrize("name", GRADIENT_ONLY)
def test_vmap_over_a_batch_of_parameter_sets(name):
    """One θ, several models trained side by side (init, then two updates, all vmapped)."""
    opt = optimizers.make(name, **DEFAULTS.get(name, {}))
    tx = opt.as_optax(opt.init(jax.random.key(0)), 10)
    batch = jax.tree.map(lambda x: jnp.stack([x, 2 * x, -x]), _params())

    def two_steps(params):
        grads = jax.tree.map(jnp.cos, params)
        state = tx.init(params)
        _, state = tx.update(grads, state, params, loss=1.0)
        return tx.update(grads, state, params, loss=1.0)[0]

    batched = jax.jit(jax.vmap(two_steps))(batch)
    single = jax.jit(two_steps)(jax.tree.map(lambda x: x[1], batch))
    for b, s in zip(jax.tree.leaves(batched), jax.tree.leaves(single), strict=True):
        assert b.shape[0] == 3
        np.testing.assert_allclose(b[1], s, rtol=VMAP_RTOL.get(name, 1e-5), atol=1e-8)


def _quadratic_losses(tx, steps):
    a = jnp.linspace(0.5, 2.0, 16)
    params = {"x": jnp.linspace(-2.0, 2.0, 16), "w": jnp.ones((4, 4))}

    def loss(p):
        return 0.5 * jnp.sum(a * p["x"] ** 2) + jnp.sum(p["w"] ** 2)

    def body(carry, _):
        p, s = carry
        value, g = jax.value_and_grad(loss)(p)
        u, s = tx.update(g, s, p, loss=value)
        return (optax.apply_updates(p, u), s), value

    _, losses = jax.jit(lambda p: jax.lax.scan(body, (p, tx.init(p)), None, steps))(params)
    return np.asarray(losses)


# M-FAC's damping λ is absolute, and the paper's 1e-5 suits deep nets' gradients: on this small
# quadratic F⁻¹ grows towards 1/λ as the gradients shrink, and the step blows up. Here it runs with
# a λ and a rate that fit (its own tests: tests/test_mfac.py).
QUADRATIC_HPARAMS = {"mfac": {"window": 32, "damping": 10.0, "learning_rate": 0.1}}


@pytest.mark.parametrize("name", GRADIENT_ONLY)
def test_initial_theta_decreases_quadratic(name):
    _, _, tx, _, _ = _setup(name, num_steps=100, hparams=QUADRATIC_HPARAMS.get(name))
    losses = _quadratic_losses(tx, 100)
    assert np.all(np.isfinite(losses))
    assert losses[-1] < 0.95 * losses[0]
    assert np.mean(np.diff(losses) < 0) > 0.9  # descent on (almost) every step


def test_adam_matches_optax():
    opt = optimizers.make("adam", learning_rate=3e-3, b1=0.8)
    tx = opt.as_optax(opt.init(jax.random.key(0)), 10)
    ref = optax.adam(3e-3, b1=0.8)
    params = _params()
    s, s_ref = tx.init(params), ref.init(params)
    for i in range(3):
        g = jax.tree.map(lambda x, i=i: jnp.sin(x * (i + 1)), params)
        u, s = tx.update(g, s, params, loss=1.0)
        u_ref, s_ref = ref.update(g, s_ref, params)
        for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(u_ref), strict=True):
            np.testing.assert_array_equal(a, b)


def test_small_fc_meta_params_and_state_size():
    opt = optimizers.make("small_fc")
    theta = opt.init(jax.random.key(0))
    assert set(theta) == {"mlp"}
    assert sum(x.size for x in jax.tree.leaves(theta)) == 1922
    state = opt.as_optax(theta, 10).init({"w": jnp.zeros((128, 128))})
    assert state.momenta.size + state.rms.size == 6 * 128 * 128  # 6 floats per parameter


def test_small_fc_theta_is_differentiable():
    """Meta-gradients flow through the update to every MLP weight matrix."""
    opt = optimizers.make("small_fc")
    theta = opt.init(jax.random.key(0))
    params = _params()
    grads = jax.tree.map(jnp.cos, params)

    def meta_loss(th):
        tx = opt.as_optax(th, 10)
        u, _ = tx.update(grads, tx.init(params), params)
        return sum(jnp.sum(x**2) for x in jax.tree.leaves(u))

    g = jax.grad(meta_loss)(theta)
    for k in ("w0", "w1", "w2"):
        assert np.all(np.isfinite(g["mlp"][k])) and np.any(g["mlp"][k] != 0), k


SLOW = pytest.mark.slow  # one case in the default run; the scales and decay rates in `pytest -m slow`


@pytest.mark.parametrize("scale, exp_mult", [
    (1.0, 0.001), pytest.param(1e-6, 0.001, marks=SLOW), pytest.param(1e4, 0.001, marks=SLOW),
    pytest.param(1.0, 0.3, marks=SLOW)])
def test_untrained_small_fc_is_adam_without_bias_correction(scale, exp_mult):
    """The initial θ steps by -step_mult · m/sqrt(v) (EMAs 0.9 and 0.999 from zero, a slow NumPy
    reference) up to its small random terms, at any gradient scale: the Adam ratios are not
    normalised per tensor, so their size (the gradient's signal-to-noise ratio) reaches the step,
    and a run that reaches its noise floor anneals as Adam does. 30 steps of noisy gradients
    with a shrinking mean, on a 2-D and a 1-D tensor; tolerance: 3% of the step's RMS. Also at
    the reference recipe's exp_mult, which scales the random magnitude terms 300x."""
    opt = optimizers.make("small_fc", hidden=16, hidden_layers=1, step_mult=0.01, exp_mult=exp_mult)
    tx = opt.as_optax(opt.init(jax.random.key(0)), 1000)
    params = {"w": jnp.zeros((20, 30)), "b": jnp.zeros((30,))}
    state = tx.init(params)
    rng = np.random.default_rng(0)
    m = {k: np.zeros(np.shape(v)) for k, v in params.items()}
    v = {k: np.zeros(np.shape(x)) for k, x in params.items()}
    for t in range(30):
        grads = {k: scale * (np.exp(-t / 10) + rng.normal(size=np.shape(x))) for k, x in params.items()}
        updates, state = tx.update(jax.tree.map(jnp.float32, grads), state, params)
        for k, g in grads.items():
            m[k] = 0.9 * m[k] + 0.1 * g
            v[k] = 0.999 * v[k] + 0.001 * g**2
            expected = -0.01 * m[k] / np.sqrt(v[k])
            err = np.sqrt(np.mean((np.asarray(updates[k]) - expected) ** 2))
            assert err < 0.03 * np.sqrt(np.mean(expected**2)), (t, k)
