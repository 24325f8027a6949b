"""metaopt.torch: the committed artifacts, and every other learned architecture of the zoo, as
torch optimizers, matched against the JAX ones step for step (the trajectories themselves come
from benchmarks/torch_numerics.py, which also writes the measured figures), trained, resumed,
refused."""

from __future__ import annotations

import io
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

import metaopt.torch as mt
from benchmarks import torch_numerics as numerics
from metaopt import optimizers, registry
from metaopt.storage import CorruptArtifactError
from tests.test_import_direction import ROOT

REGISTRY = str(ROOT / "examples" / "registry")
# The largest difference of a parameter tensor between the frameworks, over its RMS, at every
# 100th (open loop) or 20th step (closed loop). Open loop, both get the same gradients, so only
# float32 arithmetic can differ (XLA fuses and reorders sums). Closed loop, each computes its own
# gradients through its own convolution and summation order, and those differences feed back
# through the parameters. Measured: docs/figures/torch_numerics.json (docs/torch.md).
OPEN_LOOP_TOLERANCE = 1e-3
CLOSED_LOOP_TOLERANCE = 1e-3
# lstm_l2l reads sign(g) (for |g| >= e^-10): its step jumps wherever a gradient element crosses
# zero, so where the two frameworks' own gradients of an element differ in sign near zero, their
# steps differ by the whole step size, not by a rounding error. Measured 6.7e-3.
CLOSED_LOOP_TOLERANCE_SIGN_INPUT = 3e-2


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """These tensors are tiny: torch's intra-op threads only wait on each other and on JAX's.
    One thread took this file from 470 s to 153 s on the 2-core VM with a benchmark beside it
    (alone on it, 94 s against 96 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("version", [*numerics.VERSIONS, "variant", *numerics.UNTRAINED])
def test_open_loop_trajectory_matches_jax_at_every_100th_step(version):
    result = numerics.open_loop(numerics.case(version))
    assert len(result["errors"]) == 10 and max(result["errors"]) < OPEN_LOOP_TOLERANCE, result
    assert result["moved"] > 0.1  # and the parameters went somewhere


@pytest.mark.parametrize("version", [*numerics.CLOSED_LOOP_VERSIONS, "variant", *numerics.UNTRAINED])
def test_closed_loop_trajectory_matches_jax(version):
    """Each framework computes its own gradients of the same conv net on the same data."""
    result = numerics.closed_loop(numerics.case(version))
    tolerance = CLOSED_LOOP_TOLERANCE_SIGN_INPUT if version == "lstm_l2l" else CLOSED_LOOP_TOLERANCE
    assert len(result["errors"]) == 10 and max(result["errors"]) < tolerance, result
    assert result["last_loss"] < 0.5 * result["first_loss"]  # and it trained


def _digits_run(opt_factory, steps=300, seed=0):
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    opt = opt_factory(model.parameters())
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_the_champion_trains_a_torch_mlp_on_digits():
    """A model it never saw, in a framework it was not trained in: the loss falls tenfold."""
    losses = _digits_run(lambda ps: mt.load("reference@champion", ps, num_steps=300, registry=REGISTRY))
    assert losses[-1] < 0.1 * losses[0], (losses[0], losses[-1])


@pytest.mark.parametrize("version", [7, *numerics.UNTRAINED])
def test_state_dict_round_trip_mid_run_resumes_bit_for_bit(version):
    trained = numerics.case(version)

    def fresh(params):
        return mt.from_trained(trained, params, num_steps=100)

    def net():
        return torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))

    torch.manual_seed(0)
    model = net()
    x, target = torch.randn(16, 5), torch.randn(16, 1)
    opt = fresh(model.parameters())

    def step(model, opt):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), target)
        loss.backward()
        opt.step(loss=loss.detach())

    for _ in range(30):
        step(model, opt)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)  # plain tensors and numbers: no pickle of code
    resumed_model = net()
    resumed_model.load_state_dict(saved["model"])
    resumed = fresh(resumed_model.parameters())
    resumed.load_state_dict(saved["opt"])
    for _ in range(30):
        step(model, opt)
        step(resumed_model, resumed)
    for a, b in zip(model.parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_bfloat16_parameters_keep_float32_state_through_a_resume():
    p = torch.nn.Parameter(torch.randn(8, 4, dtype=torch.bfloat16))
    opt = mt.load("reference@champion", [p], num_steps=50, registry=REGISTRY)
    for _ in range(3):
        p.grad = torch.randn(8, 4, dtype=torch.bfloat16)
        opt.step()
    assert p.dtype == torch.bfloat16 and opt.state[p]["rms"].dtype == torch.float32
    saved = opt.state_dict()
    again = mt.load("reference@champion", [p], num_steps=50, registry=REGISTRY)
    again.load_state_dict(saved)  # torch would cast the state to bfloat16: it stays float32
    assert again.state[p]["momenta"].dtype == torch.float32
    assert torch.equal(again.state[p]["momenta"], opt.state[p]["momenta"])
    assert int(again.state[p]["step"]) == 3


def test_lr_multiplies_the_step_and_schedulers_work():
    def first_move(lr):  # two steps: the first, at the start of the warm-up, has rate 0
        p = torch.nn.Parameter(torch.ones(6, 3))
        opt = mt.load("reference@champion", [{"params": [p], "lr": lr}], num_steps=100, registry=REGISTRY)
        for _ in range(2):
            p.grad = torch.linspace(-1, 1, 18).reshape(6, 3)
            opt.step()
        return (p.detach() - 1.0), opt

    full, opt = first_move(1.0)
    half, _ = first_move(0.5)
    frozen, _ = first_move(0.0)
    torch.testing.assert_close(half, 0.5 * full)
    assert torch.count_nonzero(full) > 0 and torch.count_nonzero(frozen) == 0
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.1)
    opt.step()
    scheduler.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)


def test_decoupled_weight_decay_of_a_group_shrinks_its_parameters():
    a, b = torch.nn.Parameter(torch.full((4,), 2.0)), torch.nn.Parameter(torch.full((4,), 2.0))
    opt = mt.load("reference:3", [{"params": [a]}, {"params": [b], "weight_decay": 0.5}], num_steps=10,
                  registry=REGISTRY)
    for _ in range(3):
        a.grad, b.grad = torch.zeros(4), torch.zeros(4)
        opt.step()
    assert torch.all(b < a) and torch.all(a == 2.0)  # zero gradients: only the decay moves b


def test_a_tampered_artifact_is_refused_and_a_pinned_digest_is_checked(tmp_path):
    path = registry.pull("reference:4", REGISTRY, str(tmp_path / "pulled"))
    params = [torch.nn.Parameter(torch.zeros(3))]
    assert isinstance(mt.from_artifact(path, params, num_steps=10), mt.NominalMLP)
    tampered = tmp_path / "tampered"
    shutil.copytree(path, tampered)
    theta = tampered / "theta.safetensors"
    data = bytearray(theta.read_bytes())
    data[-1] ^= 0x01
    theta.write_bytes(bytes(data))
    with pytest.raises(CorruptArtifactError, match="theta.safetensors"):
        mt.from_artifact(str(tampered), params, num_steps=10)
    digest = registry.digest(REGISTRY, "reference", 4)
    assert isinstance(mt.load(f"reference@{digest}", params, num_steps=10, registry=REGISTRY), mt.NominalMLP)
    wrong = "sha256:" + "0" * 64
    with pytest.raises(registry.ArtifactNotFoundError, match=wrong):
        mt.load(f"reference@{wrong}", params, num_steps=10, registry=REGISTRY)


def _with_dmd() -> registry.TrainedOptimizer:
    opt = optimizers.make("nominal_mlp", dmd_history=4)
    theta = jax.tree.map(np.asarray, opt.init(jax.random.key(0)))
    return registry.TrainedOptimizer("nominal_mlp", 0, "nominal_mlp", opt.hparams, theta, {})


@pytest.mark.parametrize(("call", "why"), [
    (lambda p: mt.from_trained(numerics.untrained("lookahead"), p, num_steps=10), "'lookahead' optimizer"),
    (lambda p: mt.load("reference@champion", p, num_steps=0, registry=REGISTRY), "num_steps must be"),
    (lambda p: mt.load("reference@champion", p, num_steps=10, registry=REGISTRY, lr=-1.0), "lr must be"),
    (lambda p: mt.load("reference@champion", p, num_steps=10, registry=REGISTRY, learning_rate=0.0),
     "positive, finite learning_rate"),
    (lambda p: mt.load("nobody", p, num_steps=10, registry=REGISTRY), "nobody"),
    (lambda p: mt.from_trained(numerics.untrained("rnn_mlp"), p, num_steps=10, compile=True),
     "rnn_mlp cannot compile"),
    (lambda p: mt.from_trained(_with_dmd(), p, num_steps=10), "dmd_history .* not in metaopt.torch"),
])
def test_bad_input_is_refused_with_a_reason(call, why):
    with pytest.raises((ValueError, LookupError, NotImplementedError), match=why):
        call([torch.nn.Parameter(torch.zeros(3))])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
@pytest.mark.parametrize("version", [1, 4])
def test_cuda_parameters_step_as_cpu_ones_do(version):
    trained = numerics.case(version)
    init = numerics.initial()
    results = {}
    for device in ("cpu", "cuda"):
        params = {k: torch.tensor(v, device=device) for k, v in init.items()}
        opt = mt.from_trained(trained, list(params.values()), num_steps=50)
        rng = np.random.default_rng(4)
        for _ in range(50):
            for k, p in params.items():
                grad = np.asarray(rng.normal(size=numerics.SHAPES[k]) * 0.1, np.float32)
                p.grad = torch.tensor(grad, device=device)
            opt.step()
        results[device] = {k: p.cpu() for k, p in params.items()}
    for k in numerics.SHAPES:
        torch.testing.assert_close(results["cuda"][k], results["cpu"][k], rtol=1e-4, atol=1e-5)


def test_the_loss_guard_with_a_closure_takes_the_papers_exact_rule_as_jax_does():
    """lgl2o given a closure (as torch.optim.LBFGS) scores each candidate by the loss there; JAX
    gets the same loss as `loss_fn`. Both keep the learned update on the same steps."""
    opt = optimizers.make("lgl2o", learned={"name": "small_fc", "hparams": {"step_mult": 0.3}},
                          fallback={"name": "adam", "hparams": {"learning_rate": 0.05}})
    theta = jax.tree.map(np.asarray, opt.init(jax.random.key(0)))
    trained = registry.TrainedOptimizer("guarded", 0, "lgl2o", opt.hparams, theta, {})
    curvature = np.asarray(np.geomspace(0.1, 30.0, 12), np.float32)

    def jax_loss(p):
        return 0.5 * jnp.sum(curvature * jnp.square(p["w"] - 1.0))

    tx = trained.as_optax(num_steps=60)
    jax_params = {"w": jnp.zeros(12)}
    state = tx.init(jax_params)
    w = torch.zeros(12, requires_grad=True)
    opt = mt.from_trained(trained, [w], num_steps=60)

    def closure():
        opt.zero_grad()
        loss = 0.5 * torch.sum(torch.from_numpy(curvature) * torch.square(w - 1.0))
        loss.backward()
        return loss

    for _ in range(60):
        updates, state = tx.update(jax.grad(jax_loss)(jax_params), state, jax_params, loss_fn=jax_loss)
        jax_params = optax.apply_updates(jax_params, updates)
        opt.step(closure)
    assert 0 < opt.learned_steps < 60  # the guard chose each side at least once
    assert opt.learned_steps == int(state.learned_steps)
    np.testing.assert_allclose(w.detach().numpy(), np.asarray(jax_params["w"]), rtol=1e-4, atol=1e-5)


def test_sparse_gradients_are_refused_and_the_parameters_left_as_they_were():
    embedding = torch.nn.Embedding(10, 3, sparse=True)
    before = embedding.weight.detach().clone()
    opt = mt.load("reference@champion", embedding.parameters(), num_steps=10, registry=REGISTRY)
    embedding(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()
    assert torch.equal(embedding.weight, before) and not opt.state


COMPILABLE = [9, 1, "adafac_mlp"]  # nominal_mlp (the champion), small_fc, adafac_mlp
# Compiling takes seconds a case: the champion in `make test`, the others in the slow suite.
COMPILED_CASES = [9, *(pytest.param(v, marks=pytest.mark.slow) for v in COMPILABLE[1:])]


def test_the_compilable_architectures_are_these():
    assert sorted(name for name, cls in mt.ARCHITECTURES.items() if cls.compilable) == sorted(
        numerics.case(version).optimizer_name for version in COMPILABLE)


@pytest.mark.parametrize("version", COMPILED_CASES)
def test_a_compiled_step_is_the_eager_one(version):
    """torch.compile of each tensor's step (once per rank): the same trajectory, to float32
    rounding (inductor fuses and reorders), on a 0-D, 1-D, 2-D and 4-D tensor."""
    results = []
    for compiled in (False, True):
        params = {k: torch.tensor(v) for k, v in numerics.initial().items()}
        opt = mt.from_trained(numerics.case(version), list(params.values()), num_steps=30, compile=compiled)
        rng = np.random.default_rng(3)
        for _ in range(30):
            for k, p in params.items():
                p.grad = torch.tensor(np.asarray(rng.normal(size=numerics.SHAPES[k]) * 0.1, np.float32))
            opt.step()
        results.append(params)
    for k in numerics.SHAPES:
        torch.testing.assert_close(results[1][k], results[0][k], rtol=1e-5, atol=1e-6)


def test_a_tensor_compiles_while_its_mlp_activations_fit():
    """Compiled, a tensor's MLP runs in one block: up to COMPILED_ACTIVATIONS floats of hidden
    activations (benchmarks/torch_step.py measured where compiling stops paying), else eager."""
    from metaopt.torch.base import COMPILED_ACTIVATIONS

    two_layers_of_32 = numerics.untrained("small_fc")  # 64 hidden units, so up to 65,536 elements
    fits, too_big = torch.zeros(256, 256), torch.zeros(257, 256)
    opt = mt.from_trained(two_layers_of_32, [fits, too_big], num_steps=10, compile=True)
    assert fits.numel() * 64 == COMPILED_ACTIVATIONS
    assert opt._kernel(fits) is opt._compiled and opt._kernel(too_big) is opt._eager
    one_layer_of_16 = mt.load("reference:1", [too_big], num_steps=10, registry=REGISTRY, compile=True)
    assert one_layer_of_16._kernel(too_big) is one_layer_of_16._compiled


@pytest.mark.parametrize("version", COMPILED_CASES)
def test_the_compiled_step_compiles_once_per_rank_not_per_shape_step_or_lr(version):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    # Ranks 2, 1, 4 and 0, two shapes of each but the scalar; the first of rank 1 and 2 each has a
    # dimension as long as a kernel's `scalars` (9, 4: see base.kernel_scalars). (A dimension of
    # size 1, as in a 1x1 convolution, is fixed by dynamo, and a square tensor's two dimensions
    # are tied until a non-square one of its rank comes: one more graph each.)
    shapes = [(8, 4), (16, 8), (9,), (4,), (3, 2, 3, 3), (5, 4, 2, 2), ()]
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    opt = mt.from_trained(numerics.case(version), params, num_steps=20, compile=True)
    for step in range(8):
        if step == 4:
            opt.param_groups[0]["lr"] = 0.5  # as a scheduler would
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    assert counters["stats"]["unique_graphs"] == 4
