"""Train a fresh model with a trained optimizer from the registry, next to Adam.

On a fresh clone, with the reference optimizer committed in examples/registry:

    .venv/bin/python examples/use_trained_optimizer.py

or, after `make demo`, with what the demo trained:

    .venv/bin/python examples/use_trained_optimizer.py --ref quickstart --registry runs/registry

prints the final training loss of both and writes a plot of their loss curves. The trained
optimizer is an ordinary optax.GradientTransformationExtraArgs: `tx.init`, `tx.update`.
"""

from __future__ import annotations

import argparse
import pathlib

import jax
import optax

import metaopt
from metaopt import task_zoo


def train(task, tx, steps: int, seed: int = 0) -> list[float]:
    """Plain optax training of `task` for `steps` steps; the training loss of every step."""

    @jax.jit
    def step(params, state, key):
        batch_key, loss_key = jax.random.split(key)
        loss, grads = jax.value_and_grad(task.loss)(params, loss_key, task.batch(batch_key, "train"))
        updates, state = tx.update(grads, state, params, loss=loss)  # loss= is optional
        return optax.apply_updates(params, updates), state, loss

    params = task.init(jax.random.key(seed))
    state = tx.init(params)
    losses = []
    for key in jax.random.split(jax.random.key(seed + 1), steps):
        params, state, loss = step(params, state, key)
        losses.append(float(loss))
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ref", default="reference@champion",
                        help="NAME, NAME:VERSION, NAME@ALIAS or NAME@sha256:DIGEST")
    parser.add_argument("--registry", default=str(pathlib.Path(__file__).parent / "registry"))
    parser.add_argument("--task", default='{"name": "mlp", "kwargs": {"width": 32, "depth": 1, '
                        '"activation": "relu", "batch_size": 64, "seed": 7}}', help="a TaskSpec as JSON")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--adam-lr", type=float, default=1e-2)
    parser.add_argument("--plot", default="trained_vs_adam.png")
    args = parser.parse_args()

    trained = metaopt.load(args.ref, registry=args.registry)
    task = task_zoo.task(task_zoo.TaskSpec.from_json(args.task))
    curves = {
        f"{trained.ref} (learned)": train(task, trained.as_optax(num_steps=args.steps), args.steps),
        # Hand-designed optimizers come from the same registry, with the same interface.
        f"adam lr={args.adam_lr:g}": train(
            task, metaopt.optimizers.make("adam", learning_rate=args.adam_lr).as_optax({}, args.steps),
            args.steps,
        ),
    }
    for name, losses in curves.items():
        print(f"{name}: final training loss {losses[-1]:.4f}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, losses in curves.items():
        ax.plot(losses, label=name)
    ax.set(xlabel="step", ylabel="training loss", yscale="log", title=args.task)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.plot, dpi=120)
    print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
