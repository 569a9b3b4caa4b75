"""Every appliance mode side by side with native MPI.

    python -m benchmarks.modes [--out DIR] [--budget S]

Modes: Debian 12's stock UML 6.1 with the legacy mcast LAN; the stock
kernel with the hub; AppPot's own kernel (7.2, seccomp) with the hub and
one rank per appliance; the own kernel with a node's ranks in one SMP
appliance; and native Open MPI (shared memory, TCP loopback).  For each:
launch to payload (apppot-start, median of 5), the 8-byte and 1 MiB
one-way latency between two ranks (OSU-style ping-pong, benchmarks/osu.py),
and the wall time of an 8-rank hello-world allreduce job.  Writes
modes.json and modes.png to DIR and prints a Markdown table.
"""

import argparse
import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

from . import suite

STOCK = "/usr/bin/linux.uml"


def own_kernel():
    from apppot.kernelbuild import cached_builds

    found = cached_builds()
    if not found:
        raise SystemExit("modes: AppPot's kernel is missing (apppot-kernel "
                         "build)")
    return str(found[0][0])


def modes():
    own = own_kernel()
    return {
        "stock 6.1 + mcast": ["--kernel", STOCK, "--transport", "mcast"],
        "stock 6.1 + hub": ["--kernel", STOCK, "--transport", "hub"],
        "own 7.2 + hub, rank/appliance": ["--kernel", own, "--per", "rank"],
        "own 7.2, ranks share appliance": ["--kernel", own, "--per", "node"],
    }


def command(mode_args, n, argv):
    if mode_args is None:
        return None
    return [suite.tool("apppot-mpirun"), *mode_args, "-n", str(n),
            "--oversubscribe", "python3", *argv]


def latency(work, cmd_for, budget):
    data = suite.run_json(cmd_for(2, ["osu.py", "latency", "--max",
                                      str(1 << 20), "--budget", str(budget)]),
                          work.path)
    by = {r["size"]: r["value"] for r in data["results"]}
    return by[8], by[1 << 20]


def boot(work, kernel_args, k=5):
    out = []
    for _ in range(k):
        _, proc = suite.wall([suite.tool("apppot-start"), "-v", *kernel_args,
                              "python3", "-c", "pass"], work.path)
        out.append(float(re.search(r"launch to payload ([\d.]+) s",
                                   proc.stderr).group(1)))
    return statistics.median(out)


def hub_cost(work, budget):
    """The hub's own CPU time and frames during a 2-rank bandwidth test
    (stock kernel, one appliance per rank: every frame crosses the hub)."""
    cmd = [suite.tool("apppot-mpirun"), "-v", "--kernel", STOCK, "--transport",
           "hub", "--per", "rank", "-n", "2", "python3", "osu.py", "bw",
           "--max", str(1 << 20), "--budget", str(budget)]
    seconds, proc = suite.wall(cmd, work.path)
    stats = dict(re.findall(r"(\w+) ([\d.]+)", re.search(
        r"hub: (.*)", proc.stderr).group(1)))
    run = float(re.search(r"MPI run ([\d.]+) s", proc.stderr).group(1))
    frames = int(stats["frames_in"])
    return {"frames": frames, "bytes": int(stats["bytes_in"]),
            "hub_cpu_s": float(stats["cpu_s"]), "mpi_run_s": run,
            "hub_cpu_share": float(stats["cpu_s"]) / run,
            "us_per_frame": float(stats["cpu_s"]) / frames * 1e6,
            "dropped": int(stats["dropped"])}


def measure(budget):
    work = suite.Workdir()
    rows = {}
    try:
        for name, args in modes().items():
            t0 = time.monotonic()
            kernel_args = args[:2]

            def cmd_for(n, argv, args=args):
                return command(args, n, argv)
            lat8, lat1m = latency(work, cmd_for, budget)
            rows[name] = {
                "boot_s": boot(work, kernel_args),
                "lat_8B_us": lat8, "lat_1MiB_us": lat1m,
                "job8_s": suite.wall(cmd_for(8, ["-c", suite.HELLO]),
                                     work.path)[0]}
            print(f"{name}: {rows[name]} ({time.monotonic() - t0:.0f} s)",
                  file=sys.stderr, flush=True)
        rows["_hub"] = hub_cost(work, budget)
        for env in ("native-shm", "native-tcp"):
            def cmd_for(n, argv, env=env):
                return suite.mpi_command(env, n, argv)
            lat8, lat1m = latency(work, cmd_for, budget)
            rows[env] = {"boot_s": suite.launch_to_payload(work, 3)[1],
                         "lat_8B_us": lat8, "lat_1MiB_us": lat1m,
                         "job8_s": suite.job_walltime(work, env, 8)}
    finally:
        work.close()
    return rows


def table(rows):
    lines = ["| mode | launch to payload | latency 8 B | latency 1 MiB | "
             "8-rank job |", "|---|---|---|---|---|"]
    for name, r in rows.items():
        if name.startswith("_"):
            continue
        lines.append(f"| {name} | {r['boot_s']:.2f} s | {r['lat_8B_us']:.1f} "
                     f"µs | {r['lat_1MiB_us'] / 1000:.2f} ms | "
                     f"{r['job8_s']:.2f} s |")
    return "\n".join(lines)


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in rows if not n.startswith("_")]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2))
    for ax, (key, label) in zip(axes, (("lat_8B_us", "latency 8 B (µs)"),
                                       ("lat_1MiB_us", "latency 1 MiB (µs)"),
                                       ("job8_s", "8-rank job (s)")),
                                strict=True):
        ax.barh(names, [rows[n][key] for n in names], color="tab:blue")
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.invert_yaxis()
        if ax is not axes[0]:
            ax.set_yticklabels([])
    fig.suptitle("AppPot modes vs native (2 vCPU; log scale, lower is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.modes",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results", type=Path)
    parser.add_argument("--budget", type=float, default=0.3,
                        help="seconds per message size (default: 0.3)")
    args = parser.parse_args(argv)
    rows = measure(args.budget)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "modes.json").write_text(json.dumps(
        {"date": time.strftime("%Y-%m-%d"), "host_kernel": platform.release(),
         "cpus": os.cpu_count(), "rows": rows}, indent=1))
    plot(rows, args.out / "modes.png")
    print(table(rows))
    h = rows["_hub"]
    print(f"\nhub: {h['frames']} frames ({h['bytes'] >> 20} MiB) in a "
          f"{h['mpi_run_s']:.1f} s bandwidth run; hub CPU {h['hub_cpu_s']:.2f} s "
          f"({h['hub_cpu_share']:.0%}), {h['us_per_frame']:.1f} µs per frame, "
          f"{h['dropped']} dropped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
