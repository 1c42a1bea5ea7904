#!/usr/bin/env python3
"""Times the agent commands of the agentbus binary against a broker it starts; prints a table.

Starts `agentbus serve` on a free port and a throwaway database `cli_latency_<pid>` (dropped
at the end), then measures, as a shell agent sees them:

- one invocation of `send`, `history`, `agents` and `inbox --peek`: process start, the HTTP
  call, the answer printed, the process gone (the median and p90 of --runs);
- the wake-up of a waiting `inbox --wait 30`: from the moment a message to the waiting agent
  is published (`POST …/messages`) to the moment the command exits with it. The command is
  given a second to start waiting before each publish.

Usage: python3 scripts/cli_latency.py --bin target/release/agentbus [--runs 20]
Needs a PostgreSQL server (--server, default postgres://postgres@127.0.0.1:5432) and psql.
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
import urllib.request


def percentile(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * p))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/debug/agentbus")
    ap.add_argument("--server", default="postgres://postgres@127.0.0.1:5432")
    ap.add_argument("--runs", type=int, default=20)
    args = ap.parse_args()

    db = f"cli_latency_{os.getpid()}"
    broker = subprocess.Popen(
        [args.bin, "serve", "--bind", "127.0.0.1:0"],
        env=dict(os.environ, DATABASE_URL=f"{args.server}/{db}", RUST_LOG="info"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        port = None
        for line in broker.stderr:
            found = re.search(r"\(port (\d+)\)", line)
            if found:
                port = int(found.group(1))
                break
        if port is None:
            sys.exit("the broker did not start")
        base = f"http://127.0.0.1:{port}"

        def post(path, body):
            request = urllib.request.Request(
                base + path,
                data=json.dumps(body).encode(),
                headers={"Content-Type": "application/json"},
            )
            with urllib.request.urlopen(request) as answer:
                return json.load(answer)

        project = post("/api/projects", {"name": "latency"})["id"]
        env = dict(
            os.environ,
            AGENTBUS_URL=base,
            AGENTBUS_PROJECT=project,
            AGENTBUS_AGENT_ID="shell",
            AGENTBUS_AGENT_TYPE="shell",
        )
        # Joins the agent, so that what follows is owed to it.
        subprocess.run([args.bin, "inbox"], env=env, stdout=subprocess.DEVNULL)

        rows = []
        for name, command in [
            ("send", ["send", "--to", "shell", "a status line"]),
            ("history", ["history", "--limit", "20"]),
            ("agents", ["agents"]),
            ("inbox --peek", ["inbox", "--peek", "--limit", "20"]),
        ]:
            times = []
            for _ in range(args.runs):
                started = time.perf_counter()
                done = subprocess.run([args.bin, *command], env=env, stdout=subprocess.DEVNULL)
                times.append((time.perf_counter() - started) * 1000)
                if done.returncode != 0:
                    sys.exit(f"{name} exited {done.returncode}")
            rows.append((name, times))

        subprocess.run([args.bin, "inbox", "--limit", "1000"], env=env, stdout=subprocess.DEVNULL)
        times = []
        for i in range(args.runs):
            waiting = subprocess.Popen(
                [args.bin, "inbox", "--wait", "30"], env=env, stdout=subprocess.PIPE
            )
            time.sleep(1.0)
            started = time.perf_counter()
            post(
                f"/api/projects/{project}/messages",
                {"sender_agent_id": "ci", "sender_agent_type": "ci", "to": "shell", "content": f"wake {i}"},
            )
            waiting.communicate(timeout=60)
            times.append((time.perf_counter() - started) * 1000)
            if waiting.returncode != 0:
                sys.exit(f"inbox --wait exited {waiting.returncode}")
        rows.append(("publish -> inbox --wait exits", times))

        print(f"{'what':32} {'median ms':>10} {'p90 ms':>8} {'max ms':>8}  (n={args.runs})")
        for name, times in rows:
            print(
                f"{name:32} {statistics.median(times):10.1f} {percentile(times, 0.9):8.1f} {max(times):8.1f}"
            )
    finally:
        broker.terminate()
        broker.wait(timeout=30)
        subprocess.run(
            ["psql", f"{args.server}/postgres", "-qc", f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)'],
            stdout=subprocess.DEVNULL,
        )


if __name__ == "__main__":
    main()
