#!/usr/bin/env python3
"""Times the console's history queries against growing histories; prints CSV.

Fills a throwaway database (migrated by the agentbus binary) with one project's messages in
steps up to --max-rows, indexes them for search (for this prose, PostgreSQL's parser finds
the words the broker's rule does), and after each step times each query with EXPLAIN
(ANALYZE): one warm-up run, then the median of 5.

Usage: python3 scripts/history_latency.py --bin target/release/agentbus [--max-rows 10000000]
Needs psql and a PostgreSQL server (--server, default postgres://postgres@127.0.0.1:5432).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

FILL = """
INSERT INTO agent_messages (project_id, sender_agent_id, sender_agent_type, message_type, content, seq)
SELECT '{pid}', 'agent-' || (i % 17), 'worker',
  CASE WHEN i % 1000 = 0 THEN 'alert' ELSE (ARRAY['chat','status','task','result'])[1 + i % 4] END,
  'agent ' || (i % 17) || ' reports ' || (ARRAY['build','test','deploy','review','merge','lint','bench'])[1 + i % 7]
    || ' step ' || i || ' finished with ' || (ARRAY['success','warnings','retries','notes'])[1 + (i/7) % 4]
    || CASE WHEN i % ({target} / 10) = 7 THEN ' zanzibar' ELSE '' END
    || ' and the next task is queued for the shared worker pool of this project',
  i
FROM generate_series({cur} + 1, {target}) AS i;
UPDATE projects SET head_seq = {target} WHERE id = '{pid}';
INSERT INTO message_search (project_id, seq, document)
SELECT project_id, seq, strip(to_tsvector('simple', content)) FROM agent_messages
WHERE project_id = '{pid}' AND seq > {cur} AND seq <= {target};
INSERT INTO message_search_progress (project_id, indexed_seq) VALUES ('{pid}', {target})
ON CONFLICT (project_id) DO UPDATE SET indexed_seq = EXCLUDED.indexed_seq;
ANALYZE agent_messages;
ANALYZE message_search;
"""

# The queries of db::queries::history, as the console sends them.
SEARCH = """seq = ANY(ARRAY(SELECT s.seq FROM message_search s WHERE s.project_id = '{pid}'
  AND s.document @@ '''{word}'''::tsquery))"""
QUERIES = {
    "latest": "SELECT * FROM agent_messages WHERE project_id = '{pid}' ORDER BY seq DESC LIMIT 100",
    "poll": "SELECT * FROM agent_messages WHERE project_id = '{pid}' AND seq > {head} - 5 ORDER BY seq LIMIT 50",
    "scrollback": "SELECT * FROM agent_messages WHERE project_id = '{pid}' AND seq < {half} ORDER BY seq DESC LIMIT 100",
    "type_common": "SELECT * FROM agent_messages WHERE project_id = '{pid}' AND message_type = 'status' ORDER BY seq DESC LIMIT 100",
    "type_rare": "SELECT * FROM agent_messages WHERE project_id = '{pid}' AND message_type = 'alert' ORDER BY seq DESC LIMIT 100",
    # The broker indexes the project's tail first (here all is indexed), then reads the index.
    "fulltext_rare": "SELECT * FROM agent_messages WHERE project_id = '{pid}' AND " + SEARCH.replace("{word}", "zanzibar") + " ORDER BY seq + 0 DESC LIMIT 100",
}


def psql(url, sql):
    # The settings of the broker's own connections (src/db/mod.rs).
    env = dict(os.environ, PGOPTIONS="-c jit=off -c plan_cache_mode=force_custom_plan")
    out = subprocess.run(["psql", url, "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql],
                         capture_output=True, text=True, check=True, env=env)
    return out.stdout.strip()


def plan_top(node):
    """The first node that reads a table or an index."""
    if "Relation Name" in node or "Index Name" in node:
        index = node.get("Index Name")
        return f"{node['Node Type']} on {index or node['Relation Name']}"
    for child in node.get("Plans", []):
        found = plan_top(child)
        if found:
            return found
    return node["Node Type"]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--bin", required=True)
    p.add_argument("--server", default="postgres://postgres@127.0.0.1:5432")
    p.add_argument("--max-rows", type=int, default=10_000_000)
    a = p.parse_args()
    db = "perfhist"
    psql(f"{a.server}/postgres", f"DROP DATABASE IF EXISTS {db}")
    psql(f"{a.server}/postgres", f"CREATE DATABASE {db}")
    url = f"{a.server}/{db}"
    subprocess.run([a.bin, "migrate"], env={"DATABASE_URL": url, "PATH": "/usr/bin:/bin"}, check=True,
                   capture_output=True)
    pid = psql(url, "INSERT INTO projects (name) VALUES ('perf') RETURNING id").splitlines()[0]
    print("rows,query,median_ms,min_ms,max_ms,runs,plan_top", flush=True)
    cur, target = 0, 10_000
    while target <= a.max_rows:
        psql(url, FILL.format(pid=pid, cur=cur, target=target))
        for name, q in QUERIES.items():
            sql = q.format(pid=pid, head=target, half=target // 2)
            times, top = [], ""
            for run in range(6):
                plan = json.loads(psql(url, f"EXPLAIN (ANALYZE, FORMAT JSON) {sql}"))[0]
                if run:
                    times.append(plan["Execution Time"])
                top = plan_top(plan["Plan"])
            print(f"{target},{name},{statistics.median(times):.3f},{min(times):.3f},{max(times):.3f},"
                  f"{len(times)},{top}", flush=True)
        cur, target = target, target * 10
    psql(f"{a.server}/postgres", f"DROP DATABASE {db} WITH (FORCE)")


if __name__ == "__main__":
    sys.exit(main())
