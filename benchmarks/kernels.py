"""AppPot's kernel with and without its patch series, end to end, in one
run: what the cheaper guest system calls give MPI jobs.

    python -m benchmarks.kernels [--quick] [--out DIR]
    python -m benchmarks.kernels --table DIR/kernels.json

For the unpatched and the patched own kernel (both in seccomp mode, the
default, and the patched one in ptrace mode too): launch to payload of
``apppot-start -v python3 -c pass`` (apppot-start's own measurement); the
wall time of a 4- and an 8-rank hello-world allreduce job with
``--per node`` (the node's ranks in one SMP appliance) and ``--per rank``
(one appliance per rank: 8 on this machine's cores is oversubscribed);
and the one-way 8 B and 1 MiB latency between two ranks in two
appliances (benchmarks/osu.py ping-pong).  Native Open MPI (shared memory
and TCP loopback) for reference.  Every figure is the median of
``--runs`` runs.  Writes kernels.json (figures, ratios patched/unpatched,
the full configuration) and kernels.png, and prints the README table.
"""

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

from . import suite
from .syscalls import describe_kernel, machine, now, own_kernels, save

JOBS = [(n, per) for n in (4, 8) for per in ("node", "rank")]


def log(msg):
    print(f"[kernels] {msg}", file=sys.stderr, flush=True)


def configs(patched, unpatched):
    return {
        "own-unpatched-seccomp": ["--kernel", unpatched, "--seccomp", "on"],
        "own-patched-seccomp": ["--kernel", patched, "--seccomp", "on"],
        "own-patched-ptrace": ["--kernel", patched, "--seccomp", "off"],
        "native-shm": None, "native-tcp": None,
    }


def mpirun(name, opts, n, argv, per="rank"):
    if opts is None:
        return suite.mpi_command(name, n, argv)
    return [suite.tool("apppot-mpirun"), *opts, "--per", per, "-n", str(n),
            "--oversubscribe", "python3", *argv]


def launch(work, opts):
    _, proc = suite.wall([suite.tool("apppot-start"), "-v", *opts, "python3",
                          "-c", "pass"], work.path)
    return float(re.search(r"launch to payload ([\d.]+) s",
                           proc.stderr).group(1))


def latency(work, name, opts, budget):
    data = suite.run_json(mpirun(name, opts, 2, [
        "osu.py", "latency", "--max", str(1 << 20), "--budget", str(budget)]),
        work.path)
    by = {r["size"]: (r["value"], r["iterations"]) for r in data["results"]}
    return by[8], by[1 << 20]


def measure(p, patched, unpatched):
    work = suite.Workdir()
    rows = {}
    try:
        for name, opts in configs(patched, unpatched).items():
            t0 = time.monotonic()
            samples = {}

            def add(key, value, samples=samples):
                samples.setdefault(key, []).append(value)
            for _ in range(p["runs"]):
                if opts is not None:
                    add("launch_s", launch(work, opts))
                for n, per in JOBS:
                    if opts is None and per == "node":
                        continue  # native has no appliances to share
                    add(f"job{n}_per_{per}_s", suite.wall(mpirun(
                        name, opts, n, ["-c", suite.HELLO], per),
                        work.path)[0])
                (l8, it8), (l1m, it1m) = latency(work, name, opts,
                                                 p["budget"])
                add("lat_8B_us", l8)
                add("lat_1MiB_us", l1m)
                samples.setdefault("_iterations", [it8, it1m])
            rows[name] = {k: statistics.median(v) for k, v in samples.items()
                          if not k.startswith("_")}
            rows[name]["_samples"] = samples
            shown = {k: round(v, 3) for k, v in rows[name].items()
                     if not k.startswith("_")}
            log(f"{name}: {time.monotonic() - t0:.0f} s {shown}")
    finally:
        work.close()
    return rows


LABELS = {"launch_s": "launch to payload", "job4_per_node_s":
          "4-rank job, --per node", "job4_per_rank_s": "4-rank job, --per rank",
          "job8_per_node_s": "8-rank job, --per node", "job8_per_rank_s":
          "8-rank job, --per rank (oversubscribed)", "lat_8B_us":
          "latency 8 B (2 appliances)", "lat_1MiB_us":
          "latency 1 MiB (2 appliances)"}


def fmt(key, v):
    if key.endswith("_us"):
        return f"{v:.1f} µs" if v < 1000 else f"{v / 1000:.2f} ms"
    return f"{v:.2f} s"


def table(result):
    rows = result["rows"]
    names = list(rows)
    out = ["| | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for key, label in LABELS.items():
        cells = [fmt(key, rows[n][key]) if key in rows[n] else "–"
                 for n in names]
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    m = result["machine"]
    out.append(f"\n{m['cpu']}, {m['cpus']} CPUs, host {m['host_kernel']}; "
               f"{result['date'][:10]}; median of {result['profile']['runs']}"
               " runs (latency between appliances: one rank per appliance)")
    return "\n".join(out)


def plot(result, path):
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    rows = result["rows"]
    names = [n for n in rows if not n.startswith("native")]
    keys = list(LABELS)
    fig, axes = plt.subplots(1, len(keys), figsize=(16, 3.8))
    for ax, key in zip(axes, keys, strict=True):
        ax.bar(range(len(names)), [rows[n].get(key, 0) for n in names],
               color=["tab:gray", "tab:blue", "tab:cyan"][:len(names)])
        ax.set_title(LABELS[key], fontsize=8)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels([n.replace("own-", "") for n in names],
                           rotation=40, ha="right", fontsize=7)
    fig.suptitle(f"Own kernel, unpatched vs patched ({result['machine']['cpu']}"
                 f", {result['machine']['cpus']} CPUs; lower is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.kernels",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="one run, short "
                    "latency budget (a smoke test)")
    ap.add_argument("--out", default="benchmarks/results", type=Path)
    ap.add_argument("--runs", type=int)
    ap.add_argument("--patched")
    ap.add_argument("--unpatched")
    ap.add_argument("--table", type=Path, metavar="JSON")
    args = ap.parse_args(argv)
    if args.table:
        print(table(json.loads(args.table.read_text())))
        return 0
    p = {"runs": 1, "budget": 0.1} if args.quick else {"runs": 3,
                                                        "budget": 0.5}
    if args.runs:
        p["runs"] = args.runs
    patched, unpatched = own_kernels(args.patched, args.unpatched)
    t0 = time.monotonic()
    rows = measure(p, patched, unpatched)
    samples = {n: r.pop("_samples") for n, r in rows.items()}
    result = {
        "date": now(), "machine": machine(), "profile": p,
        "configs": {n: o for n, o in configs(patched, unpatched).items()},
        "kernels": {"own-unpatched": describe_kernel(unpatched),
                    "own-patched": describe_kernel(patched)},
        "hello": suite.HELLO, "rows": rows, "samples": samples,
        "ratios_patched_over_unpatched": {
            k: rows["own-patched-seccomp"][k] / rows["own-unpatched-seccomp"][k]
            for k in rows["own-unpatched-seccomp"]},
        "seconds": round(time.monotonic() - t0)}
    save(result, args.out, "kernels", table, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
