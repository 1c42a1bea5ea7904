#!/usr/bin/env python3
"""Plot the scaling curves of docs/PERFORMANCE.md from the CSV files in docs/perf/.

Reads docs/perf/{fanout,projects,memory}.csv (from `agentbus bench --csv`, with a leading
`point` column), docs/perf/history.csv (history query timings) and docs/perf/soak.csv (broker
memory during the soak), and writes one PNG per
curve next to them. Requires matplotlib (`pip install matplotlib`).

Usage: python3 scripts/plot_curves.py [PERF_DIR]
"""

import csv
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def throughput_plot(rows, xlabel, title, out, log_x=True):
    x = [int(r["point"]) for r in rows]
    msgs = [float(r["messages_per_s"]) for r in rows]
    dels = [float(r["deliveries_per_s"]) for r in rows]
    p99 = [float(r["delivery_p99_us"]) / 1000.0 for r in rows]

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    ax1.plot(x, msgs, "o-", label="messages/s")
    ax1.plot(x, dels, "s-", label="deliveries/s")
    ax1.set_xlabel(xlabel)
    ax1.set_ylabel("per second")
    ax1.set_yscale("log")
    ax1.set_title("Throughput (open loop)")
    ax1.grid(True, which="both", alpha=0.3)
    ax1.legend()
    ax2.plot(x, p99, "o-", color="tab:red", label="send → delivery p99")
    ax2.set_xlabel(xlabel)
    ax2.set_ylabel("ms")
    ax2.set_title("p99 send → delivery latency (open loop)")
    ax2.grid(True, which="both", alpha=0.3)
    ax2.legend()
    for ax in (ax1, ax2):
        if log_x:
            ax.set_xscale("log")
        ax.set_xticks(x)
        ax.set_xticklabels([str(v) for v in x])
        ax.minorticks_off() if log_x else None
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def history_plot(rows, out):
    queries = []
    for r in rows:
        if r["query"] not in queries:
            queries.append(r["query"])
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    for q in queries:
        pts = [(int(r["rows"]), float(r["median_ms"])) for r in rows if r["query"] == q]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=q)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("rows in agent_messages (one project)")
    ax.set_ylabel("execution time, ms (median of 5, EXPLAIN ANALYZE)")
    ax.set_title("History query latency versus table size")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def memory_plot(rows, out):
    x = [int(r["point"]) for r in rows]
    rss = [float(r["broker_peak_rss_mib"]) for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.4))
    ax.plot(x, rss, "o-", label="broker peak RSS (VmHWM)")
    if len(x) >= 2 and x[-1] != x[0]:
        per_conn_kib = (rss[-1] - rss[0]) * 1024 / (x[-1] - x[0])
        ax.plot(
            [x[0], x[-1]],
            [rss[0], rss[-1]],
            "--",
            alpha=0.6,
            label=f"linear, {per_conn_kib:.1f} KiB per connection",
        )
    ax.set_xlabel("idle connections")
    ax.set_ylabel("MiB")
    ax.set_title("Broker memory versus idle connections")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def soak_plot(rows, out):
    x = [int(r["seconds"]) / 60.0 for r in rows]
    rss = [int(r["broker_rss_kib"]) / 1024.0 for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.4))
    ax.plot(x, rss, "o-", markersize=3)
    ax.set_xlabel("minutes")
    ax.set_ylabel("broker RSS, MiB")
    ax.set_ylim(bottom=0)
    ax.set_title("10-minute soak at 8,000 msg/s: broker memory")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main():
    perf = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent / "docs" / "perf"
    made = []
    if (perf / "fanout.csv").exists():
        throughput_plot(
            read(perf / "fanout.csv"),
            "fan-out (recipients per message)",
            "Fan-out: 1 project, 7,800-10,000 messages of 200 B, broadcast",
            perf / "fanout.png",
        )
        made.append("fanout.png")
    if (perf / "projects.csv").exists():
        throughput_plot(
            read(perf / "projects.csv"),
            "projects (5 agents each)",
            "Projects: 10,000 messages of 200 B, broadcast, fan-out 4",
            perf / "projects.png",
        )
        made.append("projects.png")
    if (perf / "history.csv").exists():
        history_plot(read(perf / "history.csv"), perf / "history.png")
        made.append("history.png")
    if (perf / "memory.csv").exists():
        memory_plot(read(perf / "memory.csv"), perf / "memory.png")
        made.append("memory.png")
    if (perf / "soak.csv").exists():
        soak_plot(read(perf / "soak.csv"), perf / "soak.png")
        made.append("soak.png")
    print("wrote " + ", ".join(str(perf / m) for m in made))


if __name__ == "__main__":
    main()
