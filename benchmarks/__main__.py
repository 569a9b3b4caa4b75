"""Appliance vs native, side by side: ``python -m benchmarks [--quick|--full]``.

Runs the suite (benchmarks/suite.py), prints OSU-style tables and the
appliance/native ratios, and writes results.json and PNG plots to --out.
"""

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

from . import suite

GOALS = {  # the project's performance goals (appliance / native)
    "latency_small_vs_tcp": 3.0, "transfer_1MiB_vs_tcp": 5.0,
    "startup_n8_vs_native": 3.0, "memory_overhead_mib": 48.0,
}


def profile(args):
    if args.quick:
        return dict(lat_max=1 << 20, bw_max=1 << 20, coll_max=1 << 12,
                    budget=0.08, coll_n=(2, 4), wall_n=(1, 2, 4), k=3,
                    mem_n=(1, 2), hold=5.0,
                    envs=("native-shm", "native-tcp", "appliance"))
    return dict(lat_max=1 << 22, bw_max=1 << 22, coll_max=1 << 20,
                budget=0.4, coll_n=(2, 4, 8) if args.full else (2, 4),
                wall_n=(1, 2, 4, 8), k=5, mem_n=(1, 2, 4), hold=10.0,
                envs=("native-shm", "native-tcp", "appliance"))


def log(msg):
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def collect(args):
    p = profile(args)
    work = suite.Workdir()
    data = {"pt2pt": {}, "collectives": {}, "startup": {}, "memory": {}}
    try:
        for test, mx in (("latency", p["lat_max"]), ("bw", p["bw_max"]),
                         ("bibw", p["bw_max"])):
            for env in p["envs"]:
                log(f"{test} {env}")
                data["pt2pt"].setdefault(test, {})[env] = suite.osu(
                    work, env, test, 2, mx, p["budget"])
        for n in p["coll_n"]:
            for test, mx in (("allreduce", p["coll_max"]), ("barrier", 0)):
                for env in p["envs"]:
                    log(f"{test} n={n} {env}")
                    data["collectives"].setdefault(f"{test}-{n}", {})[env] = \
                        suite.osu(work, env, test, n, mx, p["budget"])
        log("launch to payload")
        appl, native = suite.launch_to_payload(work, p["k"])
        data["startup"]["launch_to_payload"] = {"appliance": appl,
                                                "native": native}
        for n in p["wall_n"]:
            for env in p["envs"]:
                log(f"job wall time n={n} {env}")
                data["startup"].setdefault(f"job-{n}", {})[env] = \
                    suite.job_walltime(work, env, n)
        for n in p["mem_n"]:
            for env in p["envs"]:
                log(f"memory n={n} {env}")
                data["memory"].setdefault(f"n{n}", {})[env] = \
                    suite.memory_per_rank(work, env, n, p["hold"])
    finally:
        work.close()
    return data


def value_at(series, size):
    return dict(series)[size]


def ratios(data):
    lat = data["pt2pt"]["latency"]
    bw = data["pt2pt"]["bw"]
    r = {
        "latency_small_vs_tcp": value_at(lat["appliance"], 8)
        / value_at(lat["native-tcp"], 8),
        "latency_small_vs_shm": value_at(lat["appliance"], 8)
        / value_at(lat["native-shm"], 8),
    }
    mib = 1 << 20  # a 1 MiB transfer: one-way ping-pong time
    r["transfer_1MiB_vs_tcp"] = (value_at(lat["appliance"], mib)
                                 / value_at(lat["native-tcp"], mib))
    r["bandwidth_1MiB_native_tcp_over_appliance"] = (
        value_at(bw["native-tcp"], mib) / value_at(bw["appliance"], mib))
    jobs = [k for k in data["startup"] if k.startswith("job-")]
    largest = max(jobs, key=lambda k: int(k.split("-")[1]))
    r[f"startup_n{largest.split('-')[1]}_vs_native"] = (
        data["startup"][largest]["appliance"]
        / data["startup"][largest]["native-shm"])
    lp = data["startup"]["launch_to_payload"]
    r["launch_to_payload_vs_process"] = lp["appliance"] / lp["native"]
    mem = data["memory"][max(data["memory"], key=lambda k: int(k[1:]))]
    r["memory_overhead_mib"] = mem["appliance"] - mem["native-shm"]
    return r


def tables(data, r):
    out = []
    for test, unit in (("latency", "Latency (us)"), ("bw", "Bandwidth (MB/s)"),
                       ("bibw", "Bandwidth (MB/s)")):
        series = data["pt2pt"][test]
        envs = list(series)
        out.append(f"# OSU MPI {test} ({unit}); appliance/native-tcp ratio")
        out.append(f"{'# Size':<10}" + "".join(f"{e:>16}" for e in envs)
                   + f"{'ratio':>10}")
        for size, _ in series["appliance"]:
            vals = [value_at(series[e], size) for e in envs]
            tcp = value_at(series["native-tcp"], size)
            ratio = (vals[-1] / tcp if test == "latency" else
                     tcp / vals[-1]) if vals[-1] and tcp else float("nan")
            out.append(f"{size:<10}" + "".join(f"{v:>16.2f}" for v in vals)
                       + f"{ratio:>10.1f}")
        out.append("")
    for name, series in data["collectives"].items():
        out.append(f"# {name} Avg Latency(us)")
        for size, _ in series["appliance"]:
            out.append(f"{size:<10}" + "".join(
                f"{value_at(series[e], size):>16.2f}" for e in series))
        out.append("")
    out.append("# startup (s): " + ", ".join(
        f"{k}: " + " / ".join(f"{e} {v:.2f}" for e, v in d.items())
        for k, d in data["startup"].items()))
    out.append("# memory per rank (MiB PSS): " + ", ".join(
        f"{k}: " + " / ".join(f"{e} {v:.1f}" for e, v in d.items())
        for k, d in data["memory"].items()))
    out.append("# ratios: " + ", ".join(
        f"{k} {v:.2f}" + (f" (goal {GOALS[k]:g})" if k in GOALS else "")
        for k, v in r.items() if v is not None))
    return "\n".join(out)


def plots(data, out):
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    files = []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, test, label in ((axes[0], "latency", "latency (µs)"),
                            (axes[1], "bw", "bandwidth (MB/s)")):
        for env, series in data["pt2pt"][test].items():
            pts = [(s, v) for s, v in series if s > 0]
            ax.plot([s for s, _ in pts], [v for _, v in pts], marker=".",
                    label=env)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("message size (bytes)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle("2 ranks: native Open MPI vs one UML appliance per rank")
    fig.tight_layout()
    files.append(out / "pt2pt.png")
    fig.savefig(files[-1], dpi=90)
    fig, ax = plt.subplots(figsize=(5.5, 4))
    jobs = sorted((int(k.split("-")[1]), v) for k, v in data["startup"].items()
                  if k.startswith("job-"))
    for env in jobs[0][1]:
        ax.plot([n for n, _ in jobs], [v[env] for _, v in jobs], marker="o",
                label=env)
    ax.set_xlabel("ranks")
    ax.set_ylabel("hello-world allreduce job wall time (s)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    files.append(out / "startup.png")
    fig.savefig(files[-1], dpi=90)
    plt.close("all")
    return files


def machine():
    import os  # noqa: PLC0415

    return {"host": platform.node(), "kernel": platform.release(),
            "cpus": os.cpu_count(), "python": platform.python_version(),
            "cpu": next((line.split(":", 1)[1].strip() for line in open(
                "/proc/cpuinfo") if line.startswith("model name")), "?"),
            "mem_gib": round(os.sysconf("SC_PAGE_SIZE")
                             * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)}


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="reduced set (about 3 minutes)")
    ap.add_argument("--full", action="store_true",
                    help="also 8-rank collectives")
    ap.add_argument("--out", default="benchmarks/results",
                    help="directory for results.json and plots")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    data = collect(args)
    (out / "raw.json").write_text(json.dumps(data))
    r = ratios(data)
    result = {"date": datetime.datetime.now(datetime.UTC).isoformat(
        timespec="seconds"), "machine": machine(),
        "mode": "quick" if args.quick else ("full" if args.full else "default"),
        "seconds": round(time.monotonic() - t0, 1), "data": data, "ratios": r,
        "goals": GOALS}
    (out / "results.json").write_text(json.dumps(result, indent=1))
    files = plots(data, out)
    print(tables(data, r))
    print(f"# wrote {out / 'results.json'}, " + ", ".join(map(str, files))
          + f" in {result['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
