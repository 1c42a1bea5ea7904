#!/usr/bin/env python3
"""Runs one `agentbus bench` on a throwaway PostgreSQL cluster with pg_stat_statements and
prints what PostgreSQL spent per statement, per stored message.

The cluster is made with initdb in a temporary directory, on a free port, with the settings
of the machine's server that matter here (fsync on, synchronous_commit on, shared_buffers,
max_wal_size, autovacuum as configured there) plus pg_stat_statements, and it is stopped and
deleted afterwards: the machine's own server is never touched.

Usage:
  python3 scripts/pg_statements.py --bin target/release/agentbus -- \
      --projects 1 --agents 5 --messages 100 --rate 50
Everything after `--` goes to `agentbus bench --spawn --json`. Prints a table (or --json):
for each statement its calls, calls per batch, rows, execution and planning time per stored
message, shared buffers hit/read/dirtied and WAL bytes per message. Statements that ran
fewer times than --min-calls (setup, verification) are left out of the table but their
time is reported in one line.
"""

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile

PG_BIN = "/usr/lib/postgresql/15/bin"

SETTINGS = [
    "shared_preload_libraries=pg_stat_statements",
    "pg_stat_statements.track=all",
    "pg_stat_statements.track_planning=on",
    "pg_stat_statements.max=2000",
    "listen_addresses=127.0.0.1",
    "fsync=on",
    "synchronous_commit=on",
    "shared_buffers=128MB",
    "max_wal_size=1GB",
    "min_wal_size=80MB",
    "autovacuum=off",
    "max_connections=100",
]

QUERY = """
SELECT json_agg(row_to_json(s)) FROM (
  SELECT regexp_replace(query, '\\s+', ' ', 'g') AS query, calls, rows,
         total_exec_time, total_plan_time, shared_blks_hit, shared_blks_read,
         shared_blks_dirtied, wal_bytes::float8 AS wal_bytes
  FROM pg_stat_statements ORDER BY total_exec_time + total_plan_time DESC) s
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def as_postgres(cmd):
    """initdb and pg_ctl refuse to run as root: as root, they run as the postgres user."""
    return ["runuser", "-u", "postgres", "--"] + cmd if os.geteuid() == 0 else cmd


def psql(port, sql, db="postgres"):
    out = subprocess.run(
        [f"{PG_BIN}/psql", "-X", "-q", "-At", "-h", "127.0.0.1", "-p", str(port),
         "-U", "postgres", "-d", db, "-c", sql],
        check=True, capture_output=True, text=True)
    return out.stdout.strip()


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default="target/release/agentbus")
    ap.add_argument("--min-calls", type=int, default=20)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the cluster's directory")
    ap.add_argument("bench", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    bench_args = [a for a in args.bench if a != "--"]

    tmp = tempfile.mkdtemp(prefix="agentbus-pgss-")
    if os.geteuid() == 0:
        shutil.chown(tmp, "postgres", "postgres")
    data = os.path.join(tmp, "data")
    port = free_port()
    subprocess.run(as_postgres([f"{PG_BIN}/initdb", "-D", data, "-U", "postgres",
                                "--auth=trust", "-E", "UTF8", "--locale=C.UTF-8"]),
                   check=True, capture_output=True)
    opts = " ".join(f"-c {s}" for s in SETTINGS) + f" -p {port} -k {tmp}"
    subprocess.run(as_postgres([f"{PG_BIN}/pg_ctl", "-D", data, "-o", opts, "-l",
                                os.path.join(tmp, "log"), "-w", "start"]),
                   check=True, capture_output=True)
    try:
        psql(port, "CREATE EXTENSION pg_stat_statements")
        psql(port, "SELECT pg_stat_statements_reset()")
        bench = subprocess.run(
            [args.bin, "bench", "--spawn", "--json", "--database-server",
             f"postgres://postgres@127.0.0.1:{port}"] + bench_args,
            capture_output=True, text=True)
        if bench.returncode != 0:
            sys.stderr.write(bench.stderr[-4000:])
            sys.exit(f"agentbus bench failed with status {bench.returncode}")
        report = json.loads(bench.stdout)
        stats = json.loads(psql(port, QUERY) or "[]")
    finally:
        subprocess.run(as_postgres([f"{PG_BIN}/pg_ctl", "-D", data, "-m", "fast", "-w", "stop"]),
                       capture_output=True)
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)

    run = report["runs"][0]
    messages = run["messages_acked"]
    batches = (run.get("batch_sizes") or {}).get("batches")
    hot = [s for s in stats if s["calls"] >= args.min_calls]
    cold = [s for s in stats if s["calls"] < args.min_calls]
    per = lambda v: v / messages  # noqa: E731
    rows = []
    for s in hot:
        rows.append({
            "query": s["query"],
            "calls": s["calls"],
            "calls_per_message": s["calls"] / messages,
            "rows": s["rows"],
            "exec_us_per_message": per(s["total_exec_time"]) * 1000,
            "plan_us_per_message": per(s["total_plan_time"]) * 1000,
            "mean_exec_us": s["total_exec_time"] * 1000 / s["calls"],
            "blks_hit_per_message": per(s["shared_blks_hit"]),
            "blks_read_per_message": per(s["shared_blks_read"]),
            "blks_dirtied_per_message": per(s["shared_blks_dirtied"]),
            "wal_bytes_per_message": per(s["wal_bytes"]),
        })
    total_exec = sum(r["exec_us_per_message"] for r in rows)
    total_plan = sum(r["plan_us_per_message"] for r in rows)
    summary = {
        "messages": messages,
        "batches": batches,
        "postgres_cpu_s": run["resources"]["postgres_cpu_s"],
        "postgres_cpu_us_per_message": (run["resources"]["postgres_cpu_s"] or 0) * 1e6 / messages,
        "exec_us_per_message": total_exec,
        "plan_us_per_message": total_plan,
        "wal_bytes_per_message": sum(r["wal_bytes_per_message"] for r in rows),
        "cold_statements": len(cold),
        "cold_ms": sum(s["total_exec_time"] + s["total_plan_time"] for s in cold),
        "delivery_p50_us": (run["latency"]["delivery_us"] or {}).get("p50"),
        "delivery_p99_us": (run["latency"]["delivery_us"] or {}).get("p99"),
    }
    if args.json:
        print(json.dumps({"summary": summary, "statements": rows}, indent=1))
        return
    print(f"{messages} messages; PostgreSQL CPU {summary['postgres_cpu_us_per_message']:.0f} µs"
          f"/message; statements: exec {total_exec:.1f} µs + plan {total_plan:.1f} µs/message;"
          f" WAL {summary['wal_bytes_per_message']:.0f} B/message; {batches} batches;"
          f" delivery p50 {summary['delivery_p50_us']} µs p99 {summary['delivery_p99_us']} µs")
    print(f"(left out: {len(cold)} statements run fewer than {args.min_calls} times,"
          f" {summary['cold_ms']:.0f} ms in all: setup and verification)")
    print(f"{'calls/msg':>9} {'exec µs':>8} {'plan µs':>8} {'mean µs':>8} {'dirtied':>7}"
          f" {'WAL B':>6}  statement (per stored message)")
    for r in rows:
        q = r["query"]
        print(f"{r['calls_per_message']:9.2f} {r['exec_us_per_message']:8.1f}"
              f" {r['plan_us_per_message']:8.1f} {r['mean_exec_us']:8.1f}"
              f" {r['blks_dirtied_per_message']:7.2f} {r['wal_bytes_per_message']:6.0f}"
              f"  {q[:110]}")


if __name__ == "__main__":
    main()
