"""The time of one optimizer step in torch and in JAX, as a ratio to Adam's in the same framework.

    python benchmarks/torch_step.py [--pylo-src PATH] [--quick] [--json] [--out DIR]

For 10k, 100k and 1M parameters (an MLP's two weight matrices and biases): torch.optim.Adam,
metaopt.torch's small_fc (reference:1: one hidden layer of 16; and small_fc_32x2, the default
shape, two hidden layers of 32) and nominal_mlp (the champion), each eager and compiled
(`compile=True`: each tensor's step through torch.compile, where it fits COMPILED_ACTIVATIONS).
Beside them the JAX step: optax.adam, small_fc (reference:1) and nominal_mlp, each jitted. With --pylo-src (a
checkout of Belilovsky-Lab/pylo; the `pylo` package on PyPI is another project), PyLO's
pure-torch small_fc_lopt (`AdafacLO_naive`: 39 features into two hidden layers of 32, the shape
of small_fc_32x2, which reads 24) runs on the same parameters as the peer for this step; its
meta-network gets random weights (the time of a step does not depend on them; the pretrained
ones come from the Hugging Face hub, which this machine cannot reach).

Also, to choose metaopt.torch.base.COMPILED_ACTIVATIONS: one square tensor of each of several
sizes, its step eager and compiled with every size compiled (`threshold` in the JSON: compiled over eager).

Each figure is the median over rounds, the candidates taking turns within a round, so a busy
moment of a shared machine costs them alike. Ratios, not absolute times, carry over to other
machines. On CUDA (when torch sees one), the torch rows run there too.
"""

from __future__ import annotations

import argparse
import functools
import json
import pathlib
import platform
import statistics
import sys
import time
import types

import jax
import jax.numpy as jnp
import optax
import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
REGISTRY = str(ROOT / "examples" / "registry")
SIZES = (10_000, 100_000, 1_000_000)
THRESHOLD_SIZES = (16_384, 65_536, 131_044, 262_144, 1_048_576)  # squares of 128, 256, 362, 512, 1024


def _widths(size: int) -> int:
    """w such that two w×w weights and two w biases hold about `size` parameters."""
    return int((-1 + (1 + 2 * size) ** 0.5) / 2)


def _torch_params(size: int, device: str) -> list[torch.nn.Parameter]:
    w = _widths(size)
    gen = torch.Generator().manual_seed(0)
    shapes = [(w, w), (w,), (w, w), (w,)]
    params = [torch.nn.Parameter((torch.randn(s, generator=gen) * 0.1).to(device)) for s in shapes]
    for p in params:
        p.grad = (torch.randn(p.shape, generator=gen) * 0.01).to(device)
    return params


def _pylo(src: pathlib.Path):
    """PyLO's AdafacLO_naive from a source checkout, its MetaMLP built with random weights. Its
    package __init__ files import every PyLO optimizer (and their dependencies, mup among them):
    the two modules this step needs are reached by their folders alone."""
    for name in ("pylo", "pylo.models", "pylo.optim"):
        sys.modules[name] = types.ModuleType(name)
        sys.modules[name].__path__ = [str(src.joinpath(*name.split(".")))]
    try:
        import huggingface_hub  # noqa: F401
    except ImportError:  # only MetaMLP's hub mixin needs it, never a step
        sys.modules["huggingface_hub"] = types.SimpleNamespace(PyTorchModelHubMixin=type("Mixin", (), {
            "__init_subclass__": classmethod(lambda cls, **kwargs: None)}))
    from pylo.models.Meta_MLP import MetaMLP
    from pylo.optim.AdafacLO_naive import AdafacLO_naive

    MetaMLP.from_pretrained = classmethod(lambda cls, key: cls(39, 32, 1))
    return AdafacLO_naive


def learned_optimizers() -> dict:
    """metaopt.torch's candidates: name -> make(params, compile)."""
    from torch_numerics import untrained  # benchmarks/, beside this script

    import metaopt.torch as mt
    from metaopt import registry

    def learned(trained):
        return lambda params, compile: mt.from_trained(trained, params, num_steps=10**6, compile=compile)

    return {"small_fc": learned(registry.load("reference:1", REGISTRY)),
            "small_fc_32x2": learned(untrained("small_fc")),  # the default shape, θ at its initial value
            "nominal_mlp": learned(registry.load("reference@champion", REGISTRY))}


def torch_candidates(pylo_src: pathlib.Path | None) -> dict:
    candidates = {"adam": lambda params: torch.optim.Adam(params, lr=1e-3)}
    for name, make in learned_optimizers().items():
        candidates[name] = functools.partial(make, compile=False)
        candidates[f"{name}_compiled"] = functools.partial(make, compile=True)
    if pylo_src is not None:
        adafac = _pylo(pylo_src)
        candidates["pylo_small_fc_naive"] = lambda params: adafac(params)
    return candidates


def _time_rounds(steps: dict, rounds: int) -> dict[str, float]:
    """Median seconds per call of each zero-argument function, taking turns."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def torch_times(size: int, device: str, pylo_src, rounds: int) -> dict[str, float]:
    candidates = torch_candidates(pylo_src)
    steps = {name: make(_torch_params(size, device)).step for name, make in candidates.items()}

    def synced(step):
        return lambda: (step(), torch.cuda.synchronize() if device == "cuda" else None)

    steps = {name: synced(step) for name, step in steps.items()}
    for step in steps.values():  # warm-up: first calls allocate state and compile
        for _ in range(3):
            step()
    return _time_rounds(steps, rounds)


def jax_times(size: int, rounds: int) -> dict[str, float]:
    from metaopt import registry

    w = _widths(size)
    key = jax.random.key(0)
    params = {"w0": 0.1 * jax.random.normal(key, (w, w)), "b0": jnp.zeros(w),
              "w1": 0.1 * jax.random.normal(key, (w, w)), "b1": jnp.zeros(w)}
    grads = jax.tree.map(lambda p: 0.01 * jnp.ones_like(p), params)
    txs = {"adam": optax.adam(1e-3),
           "small_fc": registry.load("reference:1", REGISTRY).as_optax(num_steps=10**6),
           "nominal_mlp": registry.load("reference@champion", REGISTRY).as_optax(num_steps=10**6)}
    steps = {}
    for name, tx in txs.items():
        update, state = jax.jit(tx.update), tx.init(params)

        def step(update=update, state=state):
            jax.block_until_ready(update(grads, state, params))

        steps[name] = step
    for step in steps.values():
        step()
    return _time_rounds(steps, rounds)


def compile_threshold(sizes: tuple[int, ...], rounds: int, repeats: int) -> list[dict]:
    """Compiled over eager step time of one square tensor per size, every size compiled, for the
    architectures that compile, `repeats` times (above ~100k elements it varies from run to run on
    a shared machine): where compiling stops paying sets COMPILED_ACTIVATIONS."""
    from unittest import mock

    from metaopt.torch import base

    rows = []
    with mock.patch.object(base, "COMPILED_ACTIVATIONS", float("inf")):
        for repeat in range(repeats):
            for name, make in learned_optimizers().items():
                for size in sizes:
                    w = int(size ** 0.5)
                    steps = {}
                    for compiled in (False, True):
                        p = torch.nn.Parameter(torch.randn(w, w) * 0.1)
                        p.grad = torch.randn(w, w) * 0.01
                        steps[compiled] = make([p], compiled).step
                        for _ in range(3):  # state, compilation
                            steps[compiled]()
                    times = _time_rounds(steps, rounds)
                    rows.append({"optimizer": name, "elements": w * w, "repeat": repeat,
                                 "compiled_vs_eager": times[True] / times[False]})
    return rows


def _pylo_commit(src: pathlib.Path) -> str:
    """The checkout's commit, where git can tell (a `git archive` export cannot)."""
    import subprocess

    done = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else f"source at {src} (no git metadata)"


def _row(framework: str, device: str, size: int, times: dict[str, float]) -> dict:
    return {"framework": framework, "device": device, "parameters": size, "seconds": times,
            "vs_adam": {k: v / times["adam"] for k, v in times.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pylo-src", type=pathlib.Path, help="a checkout of Belilovsky-Lab/pylo")
    parser.add_argument("--quick", action="store_true", help="10k and 100k parameters, few rounds")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--out", type=pathlib.Path, help="write torch_step.json here")
    args = parser.parse_args()
    sizes = SIZES[:2] if args.quick else SIZES
    rounds = 5 if args.quick else 30
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = []
    for size in sizes:
        for device in devices:
            times = torch_times(size, device, args.pylo_src, rounds)
            rows.append(_row("torch", device, size, times))
        rows.append(_row("jax", jax.default_backend(), size, jax_times(size, rounds)))
    threshold = compile_threshold(THRESHOLD_SIZES[:2] if args.quick else THRESHOLD_SIZES, rounds,
                                  repeats=1 if args.quick else 3)
    peer = [{"parameters": r["parameters"], "device": r["device"],
             "metaopt_small_fc_vs_pylo": r["seconds"]["small_fc_32x2"] / r["seconds"]["pylo_small_fc_naive"]}
            for r in rows if "pylo_small_fc_naive" in r["seconds"]]
    result = {"benchmark": "torch_step", "date": time.strftime("%Y-%m-%d"), "quick": args.quick,
              "pylo": None if args.pylo_src is None else _pylo_commit(args.pylo_src),
              "rounds": rounds, "machine": platform.machine(), "cpus": torch.get_num_threads(),
              "torch": torch.__version__, "jax": jax.__version__, "rows": rows, "peer": peer,
              "threshold": threshold}
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "torch_step.json").write_text(json.dumps(result, indent=2))
    if args.json:
        print(json.dumps(result))
        return
    for r in rows:
        ratios = ", ".join(f"{k} {v:.1f}x" for k, v in r["vs_adam"].items() if k != "adam")
        adam_ms = r["seconds"]["adam"] * 1e3
        print(f"{r['framework']:>5} {r['device']:<4} {r['parameters']:>9,}: adam {adam_ms:.2f} ms; {ratios}")
    for name in dict.fromkeys(t["optimizer"] for t in threshold):
        for size in dict.fromkeys(t["elements"] for t in threshold):
            ratios = [f"{t['compiled_vs_eager']:.2f}x" for t in threshold
                      if t["optimizer"] == name and t["elements"] == size]
            print(f"compiled / eager, one {size:,}-element tensor, {name}: {', '.join(ratios)}")
    for p in peer:
        ratio = p["metaopt_small_fc_vs_pylo"]
        print(f"metaopt.torch small_fc (32x2) / PyLO naive at {p['parameters']:,}: {ratio:.2f}x")


if __name__ == "__main__":
    main()
