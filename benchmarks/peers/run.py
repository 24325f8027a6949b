"""metaopt against google/learned_optimization on the same work, measured in the same run.

The peer runs from a source checkout (`--lo-src PATH`) in a virtual environment of its own that
this harness creates and pins (`--peer-venv DIR`, PEER_PINS: the same jax, jaxlib and optax as
metaopt's lock, so both sides compile with the same XLA). Its side is `peer_side.py`, a process
that answers one measurement a request; metaopt's side runs here, reusing
`benchmarks/worker_throughput.py` and `benchmarks/lopt_step.py`. Each round measures every
item on both systems back to back, who goes first alternating round by round, so the
machine's background load falls on both alike; the report gives the medians over rounds, the
ratios of medians, and the order in which everything ran.

  (a) PES on the reference configuration (MLP 64→32→10 on digits, batch 128, 8 pairs,
      truncation 10, hidden-32 per-parameter MLP optimizer: metaopt's `small_fc`, the peer's
      `AdafacMLPLOpt(hidden_size=32)` with its `TruncatedPES`), in inner steps/s (both halves
      of every pair count), in two layouts for each: one process given every core
      (metaopt: a jax device per core, as `workers.cpus` = cores; the peer: its TruncatedPES
      in one process, XLA's threads on every core), and one process pinned to each core,
      all running at once, summed (metaopt's default worker layout).
  (b) one jitted update step, returning the new parameters, at 10k, 100k and 1M float32
      parameters (four 2-D tensors): metaopt's `small_fc` and `adafac_mlp` (hidden 32) and
      optax.adam, against the peer's `AdafacMLPLOpt(hidden_size=32)`, `MLPLOpt(hidden_size=32)`
      and optax.adam.

`pes_ratio_one_process` and `pes_ratio_best_layout` are metaopt's inner steps/s over the
peer's (the best layout: each system's faster of the two); `step_ratio[size][name]` is the
peer's AdafacMLP ms over metaopt's `name` ms (and, for `adam`, peer Adam over metaopt Adam: a
check that both sides see the same machine). Without `--lo-src` only metaopt is measured, the
report says so, and every ratio is null.

    python benchmarks/peers/run.py --lo-src PATH [--peer-venv DIR] [--quick] [--json] [--out DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import pathlib
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path[:0] = [str(ROOT), str(HERE)]  # run as a script: metaopt's benchmarks and timing.py

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import timing  # noqa: E402

from benchmarks import lopt_step, worker_throughput  # noqa: E402
from metaopt import optimizers, task_zoo  # noqa: E402
from metaopt.task_zoo.images import load_images  # noqa: E402

# The peer's environment: what learned_optimization's modules used here import (its setup.py
# pins versions from 2021 that no longer install beside a current jax), at metaopt's versions
# where both use a package.
PEER_PINS = (
    "jax==0.10.2", "jaxlib==0.10.2", "numpy==2.4.6", "optax==0.2.8", "flax==0.12.8",
    "dm-haiku==0.0.17", "chex==0.1.92", "gin-config==0.5.0", "absl-py==2.5.1", "tqdm==4.70.1",
)
SIZES = (10_000, 100_000, 1_000_000)
METAOPT_LEARNED = ("small_fc", "adafac_mlp")
PARTICLES = worker_throughput.REFERENCE_PARTICLES
INNER_STEPS_PER_ESTIMATE = 2 * PARTICLES * worker_throughput.TRUNCATION_LENGTH
LAYOUTS = ("one_process", "pinned")


def ensure_peer_venv(venv_dir: pathlib.Path) -> pathlib.Path:
    """The Python of a virtual environment at `venv_dir` holding exactly PEER_PINS, created (or
    re-created, if its pins differ) with pip from the package registry. Returns its python."""
    python, stamp = venv_dir / "bin" / "python", venv_dir / "peer-pins.txt"
    if stamp.exists() and stamp.read_text() == "\n".join(PEER_PINS) and python.exists():
        return python
    print(f"creating the peer's virtual environment in {venv_dir} (pip, a few minutes)", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv_dir)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", *PEER_PINS], check=True)
    stamp.write_text("\n".join(PEER_PINS))
    return python


class Lines:
    """A child process spoken to in lines: `ask(line)` writes one, `read()` reads one answer."""

    def __init__(self, argv: list[str], env: dict | None = None, core: int | None = None):
        if core is not None:  # pinned before it starts, so XLA sizes its thread pools to one core
            # (taskset, not a preexec_fn: forking this multithreaded jax process to run Python
            # in the child can deadlock)
            if shutil.which("taskset") is None:
                raise RuntimeError("pinning a process to a core needs taskset (util-linux): install it")
            argv = ["taskset", "--cpu-list", str(core), *argv]
        self.argv = argv
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)

    def ask(self, line: str) -> None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def read(self) -> str:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{shlex.join(self.argv)} exited ({self.proc.wait()}) without answering; "
                               "run it alone to see its error")
        return line.strip()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class Metaopt:
    """metaopt's side: PES in this process and in pinned lanes, update steps in this process."""

    def __init__(self, cpus: list[int], sizes: tuple[int, ...], pes_seconds: float, lock_dir: str):
        lane = [sys.executable, worker_throughput.__file__, "--lane", lock_dir, "--particles", str(PARTICLES),
                "--seconds", str(pes_seconds)]
        # this checkout's metaopt, not an installed one
        path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        env = {**os.environ, "PYTHONPATH": path}
        self.lanes = [Lines(lane, env, core=c) for c in cpus]  # they compile while this does
        try:
            task = task_zoo.task(worker_throughput.TASK)
            self._estimate = worker_throughput.pes_truncation(task, optimizers.make("small_fc"), PARTICLES)
            for _ in range(3):
                self._estimate()
        except BaseException:
            self.close()
            raise
        self.pes_seconds = pes_seconds
        self.params = {n: lopt_step.make_params(n) for n in sizes}
        self._steps: dict[int, dict] = {}

    def wait_ready(self) -> None:
        for lane in self.lanes:
            if lane.read() != "ready":
                raise RuntimeError("a metaopt PES lane failed to start")

    def pes_one_process(self) -> float:
        return timing.rate(self._estimate, self.pes_seconds, INNER_STEPS_PER_ESTIMATE)

    def pes_pinned(self) -> float:
        for lane in self.lanes:
            lane.ask("go")
        return sum(json.loads(lane.read())["inner_steps_per_s"] for lane in self.lanes)

    def step_ms(self, n: int, repeats: int) -> dict[str, float]:
        if n not in self._steps:
            self._steps[n] = update_steps(self.params[n])
        return {name: timing.median_ms(fn, repeats) for name, fn in self._steps[n].items()}

    def close(self) -> None:
        for lane in self.lanes:
            lane.close()


def update_steps(params: dict) -> dict:
    """{name: blocking callable of one jitted update + apply_updates} for metaopt's learned
    optimizers at their initial θ and optax.adam, as the peer's updates return new parameters."""
    grads = jax.tree.map(lambda x: 0.01 * x, params)
    txs = {name: (lambda o: o.as_optax(o.init(jax.random.key(1)), 1000))(optimizers.make(name))
           for name in METAOPT_LEARNED}
    txs["adam"] = optax.adam(1e-3)
    calls = {}
    for name, tx in txs.items():
        @jax.jit
        def step(p, s, g, tx=tx):
            updates, s = tx.update(g, s, p)
            return optax.apply_updates(p, updates), s

        state = tx.init(params)
        calls[name] = lambda step=step, state=state: jax.block_until_ready(step(params, state, grads))
    return calls


class Peer:
    """The peer's side: one `peer_side.py` server given every core (PES and steps) and one pinned
    PES-only server per core, all in the peer's own environment."""

    def __init__(self, python: str, script: str, lo_src: str, data: str, cpus: list[int], pes_seconds: float,
                 shapes: dict[int, list[list[int]]]):
        self.shapes = shapes  # metaopt's parameter shapes for each update-step size
        env = {**os.environ, "PYTHONPATH": lo_src}
        argv = [python, script, "--data", data, "--particles", str(PARTICLES)]
        self.main = Lines(argv, env)
        self.lanes = [Lines(argv, env, core=c) for c in cpus]
        self.pes_seconds = pes_seconds
        self.info: dict = {}

    def wait_ready(self) -> None:
        for server in (self.main, *self.lanes):
            self.info = json.loads(server.read())
            if not self.info.get("ready"):
                raise RuntimeError(f"the peer side did not start: {self.info}")

    def _pes(self, servers) -> float:
        for server in servers:
            server.ask(json.dumps({"pes_seconds": self.pes_seconds}))
        return sum(json.loads(server.read())["inner_steps_per_s"] for server in servers)

    def pes_one_process(self) -> float:
        return self._pes([self.main])

    def pes_pinned(self) -> float:
        return self._pes(self.lanes)

    def step_ms(self, n: int, repeats: int) -> dict[str, float]:
        self.main.ask(json.dumps({"step_shapes": self.shapes[n], "repeats": repeats}))
        return json.loads(self.main.read())["ms"]

    def close(self) -> None:
        for server in (self.main, *self.lanes):
            server.close()


def run(args) -> dict:
    cpus = sorted(os.sched_getaffinity(0))  # one pinned process on each
    quick = args.quick
    rounds = args.rounds or (3 if quick else 7)
    pes_seconds = args.pes_seconds or (2.0 if quick else 6.0)
    repeats = 3 if quick else 10
    sizes = tuple(args.sizes)
    peer_info: dict = {"measured": False, "reason": "no --lo-src given: the peer was not measured"}
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        peer = None
        if args.lo_src:  # started first: it compiles while metaopt does
            data = load_images("digits")
            np.savez(f"{tmp}/digits.npz", train_x=np.asarray(data.train_x), train_y=np.asarray(data.train_y))
            python = args.peer_python or str(ensure_peer_venv(args.peer_venv))
            shapes = {n: [list(x.shape) for x in lopt_step.make_params(n).values()] for n in sizes}
            peer = Peer(python, str(args.peer_script), str(args.lo_src), f"{tmp}/digits.npz", cpus,
                        pes_seconds, shapes)
            stack.callback(peer.close)
        metaopt = Metaopt(cpus, sizes, pes_seconds, tmp)
        stack.callback(metaopt.close)
        metaopt.wait_ready()
        if peer:
            peer.wait_ready()
            versions = {k: v for k, v in peer.info.items() if k != "ready"}
            peer_info = {"measured": True, "source": str(args.lo_src), "python": python,
                         "script": str(args.peer_script), **versions}
        systems = {"metaopt": metaopt, **({"peer": peer} if peer else {})}
        results, order = _rounds(systems, sizes, rounds, repeats)
    return _report(results, order, peer_info, sizes, rounds, quick, len(cpus))


def _rounds(systems: dict, sizes, rounds: int, repeats: int):
    """Every item on every system, round after round; who goes first alternates by round.
    Returns ({system: {item: [value per round]}}, [{"round", "system", "item"} in run order])."""
    items = {
        "pes_one_process": lambda s: s.pes_one_process(),
        "pes_pinned": lambda s: s.pes_pinned(),
        **{f"step_{n}": (lambda s, n=n: s.step_ms(n, repeats)) for n in sizes},
    }
    results: dict = {name: {item: [] for item in items} for name in systems}
    order = []
    for r in range(rounds):
        names = list(systems) if r % 2 == 0 else list(reversed(systems))
        for item, measure in items.items():
            for name in names:
                results[name][item].append(measure(systems[name]))
                order.append({"round": r, "system": name, "item": item})
        print(f"round {r + 1}/{rounds} done", file=sys.stderr, flush=True)
    return results, order


def _report(results, order, peer_info, sizes, rounds, quick, cores) -> dict:
    pes = {name: {layout: statistics.median(per[f"pes_{layout}"]) for layout in LAYOUTS}
           for name, per in results.items()}
    for figures in pes.values():
        figures["best_layout"] = max(LAYOUTS, key=lambda layout: figures[layout])
    steps, step_ratio = [], {}
    for n in sizes:
        row = {"size": n, "n_params": sum(x.size for x in jax.tree.leaves(lopt_step.make_params(n)))}
        for name, per in results.items():
            values = per[f"step_{n}"]
            row[f"{name}_ms"] = {k: statistics.median([v[k] for v in values]) for k in values[0]}
        steps.append(row)
        if "peer" in results:
            peer_ms, ours = row["peer_ms"], row["metaopt_ms"]
            step_ratio[str(n)] = {**{k: peer_ms["adafac_mlp"] / ours[k] for k in METAOPT_LEARNED},
                                  "adam": peer_ms["adam"] / ours["adam"]}
    measured = "peer" in results
    best = {name: pes[name][pes[name]["best_layout"]] for name in pes}
    return {
        "benchmark": "peers", "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": shlex.join([os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]]), "quick": quick,
        "cores": cores, "rounds": rounds, "jax": jax.__version__, "peer": peer_info,
        "task": worker_throughput.TASK.to_json(), "particles": PARTICLES,
        "truncation_length": worker_throughput.TRUNCATION_LENGTH,
        "pes_inner_steps_per_s": pes,
        "pes_ratio_one_process": (pes["metaopt"]["one_process"] / pes["peer"]["one_process"]
                                  if measured else None),
        "pes_ratio_best_layout": best["metaopt"] / best["peer"] if measured else None,
        "steps": steps, "step_ratio": step_ratio if measured else None,
        "per_round": results, "order": order,
    }


def print_report(r: dict) -> None:
    pes = r["pes_inner_steps_per_s"]
    print(f"PES, 8 pairs, truncation 10, inner steps/s (medians of {r['rounds']} alternating rounds):")
    for name, figures in pes.items():
        print(f"  {name:8s} one process {figures['one_process']:8.0f}   "
              f"{r['cores']} pinned processes {figures['pinned']:8.0f}   best: {figures['best_layout']}")
    if not r["peer"]["measured"]:
        print(f"  peer: not measured ({r['peer']['reason']})")
    else:
        print(f"  metaopt / peer: one process {r['pes_ratio_one_process']:.2f}x, "
              f"best layouts {r['pes_ratio_best_layout']:.2f}x")
    print("update step, ms (median):")
    for row in r["steps"]:
        line = f"  {row['n_params']:>9,} params  metaopt " + " ".join(
            f"{k} {v:.3f}" for k, v in row["metaopt_ms"].items())
        if "peer_ms" in row:
            line += "  | peer " + " ".join(f"{k} {v:.3f}" for k, v in row["peer_ms"].items())
            ratios = r["step_ratio"][str(row["size"])]
            line += "  | peer AdafacMLP / " + ", ".join(f"{k} {v:.1f}x" for k, v in ratios.items())
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lo-src", type=pathlib.Path,
                        help="a google/learned_optimization source checkout (the folder holding "
                             "learned_optimization/); without it only metaopt is measured")
    parser.add_argument("--peer-venv", type=pathlib.Path,
                        default=pathlib.Path.home() / ".cache" / "metaopt" / "peer-venv",
                        help="where the peer's pinned virtual environment lives (created if missing)")
    parser.add_argument("--quick", action="store_true", help="3 short rounds (a few minutes)")
    parser.add_argument("--rounds", type=int, help="alternating rounds (default 3 quick, 7 full)")
    parser.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=list(SIZES),
                        help="update-step sizes, comma-separated (default 10000,100000,1000000)")
    parser.add_argument("--pes-seconds", type=float, help="PES time per system, layout and round "
                        "(default 2 quick, 6 full)")
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    parser.add_argument("--out", type=pathlib.Path, help="write peers.json here")
    # For tests: another interpreter and peer-side script (a fake peer) instead of the venv's.
    parser.add_argument("--peer-python", help=argparse.SUPPRESS)
    parser.add_argument("--peer-script", type=pathlib.Path, default=HERE / "peer_side.py",
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.lo_src and not (args.lo_src / "learned_optimization").is_dir():
        parser.error(f"--lo-src {args.lo_src} holds no learned_optimization/ package folder: "
                     "pass the root of a google/learned_optimization checkout")
    # One jax CPU device per core, before jax starts, as worker_throughput does for one process.
    jax.config.update("jax_num_cpu_devices", len(os.sched_getaffinity(0)))
    result = run(args)
    print_report(result)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "peers.json").write_text(json.dumps(result, indent=2))
    if args.json:
        print(json.dumps(result, allow_nan=False))  # a NaN or infinite figure fails here, loudly


if __name__ == "__main__":
    main()
