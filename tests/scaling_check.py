"""The scaling model (distcnn.scaling) against training runs across simulated hosts.

    .venv/bin/python tests/scaling_check.py [--layouts 1x1,2x2,1x1x1x1] [--batches 16,64]

Needs what tests/test_multihost.py needs (root, `ip`, `unshare`, Hydra). For each layout (ranks
per simulated host) it runs `python -m distcnn.doctor` (alpha/beta fitted to allreduces of 8 B
to 4 MiB, the compute time per step) and then `python -m distcnn.train --batch-size N*b` with
the reference model on data/mnist.h5, and prints one JSON line per (layout, b) and a Markdown
table: the doctor's prediction for that N and b next to the median images/s the run logged.
Not a test (nothing is asserted): the figures depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import netns  # noqa: E402

from distcnn import scaling  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layouts", default="1x1,2x2,1x1x1x1")
    ap.add_argument("--batches", default="16,64")
    a = ap.parse_args()
    why = netns.unavailable()
    if why:
        print(f"error: {why}", file=sys.stderr)
        return 2
    layouts = [[int(k) for k in x.split("x")] for x in a.layouts.split(",")]
    batches = [int(b) for b in a.batches.split(",")]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    py = [sys.executable, "-m"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        netns.remove_stale()
        cluster = netns.Cluster(max(len(x) for x in layouts), work)
        try:
            for layout in layouts:
                n, name = sum(layout), "x".join(map(str, layout))
                doc = subprocess.run(
                    [*cluster.mpiexec(layout), *py, "distcnn.doctor", "--checkpoint-dir", "ck"],
                    env=env, cwd=work, capture_output=True, text=True, timeout=900,
                )  # fmt: skip
                if doc.returncode != 0:
                    print(doc.stdout + doc.stderr, file=sys.stderr)
                    return 1
                line = next(x for x in doc.stdout.splitlines() if x.startswith('{"kind": "scal'))
                rec = json.loads(line)
                net = scaling.Network("measured", rec["alpha"], rec["beta"])
                for b in batches:
                    tc = rec["compute_seconds"][str(b)]
                    (pred,) = scaling.predict(net, {b: tc}, rec["grad_bytes"], [n])
                    run_dir = work / f"run-{name}-{b}"
                    run_dir.mkdir()
                    steps = max(30, 960 // b)
                    res = subprocess.run(
                        [*cluster.mpiexec(layout), *py, "distcnn.train", "--batch-size",
                         str(n * b), "--max-steps", str(steps), "--log", "log.jsonl",
                         "--log-every", "5", "--no-progress", "--checkpoint-dir", "ck",
                         "--checkpoint-every", "1000000"],
                        env=env, cwd=run_dir, capture_output=True, text=True, timeout=1800,
                    )  # fmt: skip
                    if res.returncode != 0:
                        print(res.stderr, file=sys.stderr)
                        return 1
                    recs = [json.loads(x) for x in (run_dir / "log.jsonl").read_text().split("\n")
                            if x]  # fmt: skip
                    ips = [r["images_per_sec"] for r in recs if r["kind"] == "step"][1:]
                    row = {
                        "layout": name, "ranks": n, "batch": b,
                        "alpha_us": rec["alpha"] * 1e6, "beta_ns": rec["beta"] * 1e9,
                        "compute_ms": tc * 1e3, "predicted": pred.images_per_sec,
                        "measured": statistics.median(ips),
                        "load": os.getloadavg()[0],
                    }  # fmt: skip
                    row["ratio"] = row["measured"] / row["predicted"]
                    print(json.dumps(row), flush=True)
                    rows.append(row)
        finally:
            cluster.close()
    print("| hosts x ranks | N | batch/rank | fitted alpha | fitted beta | compute/step | "
          "predicted img/s | measured img/s | measured / predicted |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['layout']} | {r['ranks']} | {r['batch']} | {r['alpha_us'] / 1000:.2f} ms | "
            f"{r['beta_ns']:.1f} ns/B | {r['compute_ms']:.0f} ms | {r['predicted']:,.0f} | "
            f"{r['measured']:,.0f} | {r['ratio']:.2f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
