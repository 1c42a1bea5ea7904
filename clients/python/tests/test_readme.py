"""The README's examples run as written, against a real broker, and print what it says."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from conftest import CLIENT_DIR, Broker

README = (CLIENT_DIR / "README.md").read_text()
BLOCKS = re.findall(r"```(\w*)\n(.*?)```", README, re.S)
EXAMPLES = [code for lang, code in BLOCKS if lang == "python" and 'os.environ["AGENTBUS_PROJECT"]' in code]


def _run(code: str, broker: Broker, project_id: str) -> list[str]:
    env = {**os.environ, "AGENTBUS_URL": broker.url, "AGENTBUS_PROJECT": project_id}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_the_readme_has_both_examples() -> None:
    assert len(EXAMPLES) == 2
    assert "AgentBus.connect" in EXAMPLES[0] and "agentbus.sync.connect" in EXAMPLES[1]


def test_async_example_prints_what_the_readme_says(broker: Broker, project_id: str) -> None:
    promised = README.split("It prints:\n\n```\n", 1)[1].split("```", 1)[0].splitlines()
    printed = _run(EXAMPLES[0], broker, project_id)
    assert len(printed) == len(promised)
    for got, said in zip(printed, promised):
        # The round-trip time differs from run to run; everything else is exact.
        pattern = re.escape(said).replace(r"9\ ms", r"\d+\ ms")
        assert re.fullmatch(pattern, got), (got, said)


def test_sync_example_runs(broker: Broker, project_id: str) -> None:
    printed = _run(EXAMPLES[1], broker, project_id)
    assert printed[0] == "stored as seq 1"
    assert printed[1] == "1 ci build 118 is green"
    assert printed[2] == "['ci']"
