"""Is a local swarm slower with the trust boundary? `swarm local` at this commit against the commit before it, run
alternately in one session on the same machine.

Each variant is checked out in its own git worktree and run as `python -m peers.cli local --stages 2 --replicas 2
--steps N` from there (the worktree's `swarm` and `peers` are imported, by the launcher and by every peer it
starts). Reported per run: the trainer's training time and tokens/s (from its summary: from the first micro-batch
to the last step), the whole command's wall time (start-up and shutdown included) and the CPU seconds of all its
processes (user + system of every descendant the launcher waited for: the roles and their DHT processes; a p2p
daemon killed at shutdown may be missed, alike for both). The order alternates (base, head, head, base, ...) so a
drift of the machine's load hits both; the load average is recorded before each run.

    python experiments/trust/local_speed.py --base 40e87eb --steps 50 --repeats 2   # writes local_speed.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", "-C", ROOT, *args], check=True, capture_output=True, text=True
    ).stdout.strip()


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_once(tree: str, steps: int, workdir: str) -> dict:
    summary = os.path.join(workdir, "summary.json")
    env = dict(os.environ, PYTHONPATH=tree)
    cmd = [
        sys.executable,
        "-m",
        "peers.cli",
        "local",
        "--stages",
        "2",
        "--replicas",
        "2",
        "--steps",
        str(steps),
        "--workdir",
        workdir,
        "--summary-json",
        summary,
    ]
    load = os.getloadavg()[0]
    cpu0, wall0 = _children_cpu(), time.monotonic()
    proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=3600)
    wall, cpu = time.monotonic() - wall0, _children_cpu() - cpu0
    if proc.returncode != 0:
        raise RuntimeError(f"swarm local failed in {tree}: {proc.stdout[-2000:]} {proc.stderr[-2000:]}")
    with open(summary) as f:
        s = json.load(f)
    mb = s["microbatches"]
    return dict(
        train_s=round(s["elapsed_s"], 1),
        tokens_per_s=round(s["tokens_per_s"], 1),
        wall_s=round(wall, 1),
        cpu_s=round(cpu, 1),
        cpu_s_per_step=round(cpu / steps, 2),
        loss_last=round(s["loss_last"], 4),
        completed=mb["completed"],
        dropped=mb["dropped"],
        load_before=round(load, 2),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--base", default="40e87eb", help="the commit to compare with (default: before issue 13)"
    )
    parser.add_argument("--head", default="HEAD")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each variant, alternating")
    parser.add_argument("--out", default=os.path.join(HERE, "local_speed.json"))
    args = parser.parse_args()
    commits = {
        "base": _git("rev-parse", "--short", args.base),
        "head": _git("rev-parse", "--short", args.head),
    }
    scratch = tempfile.mkdtemp(prefix="local-speed-")
    trees = {}
    try:
        for name, commit in commits.items():
            trees[name] = os.path.join(scratch, name)
            _git("worktree", "add", "--detach", "-f", trees[name], commit)
        order = []
        for i in range(args.repeats):
            order += ["base", "head"] if i % 2 == 0 else ["head", "base"]
        runs = {"base": [], "head": []}
        for i, name in enumerate(order):
            result = run_once(trees[name], args.steps, os.path.join(scratch, f"run{i}-{name}"))
            runs[name].append(result)
            print(f"{name} ({commits[name]}): {json.dumps(result)}", flush=True)
    finally:
        for tree in trees.values():
            subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", tree], capture_output=True)
        subprocess.run(["git", "-C", ROOT, "worktree", "prune"], capture_output=True)
        shutil.rmtree(scratch, ignore_errors=True)

    def median(name: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[name])

    summary = {
        key: dict(
            base=median("base", key),
            head=median("head", key),
            ratio=round(median("head", key) / median("base", key), 3),
        )
        for key in ("train_s", "tokens_per_s", "wall_s", "cpu_s")
    }
    out = dict(
        machine=f"{os.cpu_count()} cores, {platform.machine()}",
        commits=commits,
        steps=args.steps,
        repeats=args.repeats,
        order=order,
        runs=runs,
        medians=summary,
    )
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    for key, row in summary.items():
        print(f"{key:>13}: base {row['base']:>9}  head {row['head']:>9}  head/base {row['ratio']}")


if __name__ == "__main__":
    main()
