#!/usr/bin/env python3
"""Side note: wall time of the official per-head code against `kvcompact compact-head`, 1 thread each.

Usage:
    OMP_NUM_THREADS=1 /work/venvs/kvpress/bin/python golden/am_official/timing.py SRC target/release/kvcompact

Interleaved per (head, method, budget) so that both sides see the same machine load: the official
`compute_compacted_cache` (torch float32, 1 thread) and `compact-head` (`--threads 1`: kvcompact sizes its own pool and ignores RAYON_NUM_THREADS; its
printed `seconds` is the compaction alone, without file I/O or evaluation), REPEATS runs each, best
kept. Writes golden/am_official/timing.json. Nothing here is asserted by a test.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from run_official import CASES, GOLDEN_AM, METHODS, WRAPPER_FIELDS, load_default_configs  # noqa: E402

OURS = {"official-highest": "am-highest", "official-omp": "am-omp"}
REPEATS = 5


def cpu_model():
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("src")
    ap.add_argument("kvcompact")
    ap.add_argument("--out", default=str(HERE / "timing.json"))
    ap.add_argument("--heads", nargs="*", default=None,
                    help="compact-head input files to time instead of golden/am's five heads "
                         "(e.g. written by `kvcompact compact --dump-heads DIR`)")
    ap.add_argument("--repeats", type=int, default=REPEATS)
    args = ap.parse_args()
    sys.path.insert(0, str(Path(args.src).resolve()))
    from compaction.algorithms import ALGORITHM_REGISTRY  # noqa: E402

    torch.set_num_threads(1)
    configs, _ = load_default_configs(args.src)
    env = dict(os.environ, RAYON_NUM_THREADS="1")
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        cases = [(c, GOLDEN_AM / f"{c}.safetensors") for c in CASES]
        if args.heads:
            cases = [(f"{Path(h).parent.name}/{Path(h).stem}", Path(h)) for h in args.heads]
        for case, path in cases:
            h = load_file(str(path))
            K, V, Q = (h[n].to(torch.float32).contiguous() for n in ("keys", "values", "queries"))
            T = K.shape[0]
            for tag, t in (("t10", T // 10), ("t50", T // 50)):
                for method, cfg_name in METHODS.items():
                    cfg = configs[cfg_name]
                    kwargs = {k: v for k, v in cfg.items() if k not in WRAPPER_FIELDS}
                    off, ours, strict = [], [], []
                    for _ in range(args.repeats):
                        torch.manual_seed(0)
                        alg = ALGORITHM_REGISTRY[cfg["algorithm"]](**kwargs)
                        t0 = time.perf_counter()
                        alg.compute_compacted_cache(K, V, Q, t)
                        off.append(time.perf_counter() - t0)
                        for flags, acc in (([], ours), (["--strict-parity"], strict)):
                            cmd = [args.kvcompact, "--threads", "1", "compact-head", "--input", str(path), "--output", f"{tmp}/o.safetensors",
                                   "--method", OURS[method], "--budget", str(t), *flags]
                            r = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
                            acc.append(json.loads(r.stdout)["seconds"])
                    key = f"{case}.{OURS[method]}.{tag}"
                    rows[key] = {"official_s": min(off), "ours_default_s": min(ours), "ours_strict_s": min(strict),
                                 "ratio_default": min(ours) / min(off), "ratio_strict": min(strict) / min(off)}
                    print(f"{key:22s} official {min(off):.4f}s  ours {min(ours):.4f}s (x{min(ours) / min(off):.2f})  "
                          f"strict {min(strict):.4f}s (x{min(strict) / min(off):.2f})", flush=True)
    doc = {"torch": torch.__version__, "repeats": args.repeats, "heads": [str(p) for _, p in cases],
           "cpu": cpu_model(), "threads": 1, "load_note": "shared 2-core machine; best of REPEATS",
           "loadavg_at_end": os.getloadavg(), "rows": rows}
    # Sums per head set, method and budget: steadier than single rows.
    groups = {}
    for key, r in rows.items():
        case, method, tag = key.rsplit(".", 2)
        g = groups.setdefault((case.split("/")[0], method, tag), [0.0, 0.0, 0])
        g[0] += r["official_s"]
        g[1] += r["ours_default_s"]
        g[2] += 1
    doc["sums"] = {f"{s}.{m}.{t}": {"cases": n, "official_s": o, "ours_default_s": u, "speedup": o / u} for (s, m, t), (o, u, n) in sorted(groups.items())}
    for k, v in doc["sums"].items():
        print(f"{k:28s} {v['cases']} cases  official {v['official_s']:.3f}s  ours {v['ours_default_s']:.3f}s  ours {v['speedup']:.2f}x faster")
    Path(args.out).write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
