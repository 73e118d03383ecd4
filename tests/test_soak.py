"""Soak: 16 ranks on this 2-core machine, heavy-tailed random delays, aau and async.

Every rank must finish, every payload read must pass its checksum (crc32 in
the header, verified on read: zero torn or corrupt copies), and each rank's
resident memory must stay flat. SOAK_SECONDS sets the training time per
policy (default 20 s in the test suite; `make soak` runs 300 s).
"""

import json
import os

import numpy as np
import pytest

from launcher import MLP, launch, launcher_required, read_lines

pytestmark = [launcher_required(), pytest.mark.soak]
SECONDS = float(os.environ.get("SOAK_SECONDS", 20))
RANKS = 16


@pytest.mark.parametrize("policy", ["aau", "async"])
def test_sixteen_ranks_with_pareto_delays_finish_with_whole_payloads_and_flat_memory(
        tmp_path, policy):
    result = launch(RANKS, "--config", "jobs/demo.yaml", MLP, f"output.dir={tmp_path}",
                    "name=soak", f"policy.name={policy}", "topology.name=exponential",
                    "stragglers={name: random, distribution: pareto, probability: 0.05, "
                    "scale: 0.01, shape: 1.5}",
                    "budget.epochs=null", f"budget.seconds={SECONDS}", "eval.every_epochs=null",
                    f"eval.every_seconds={SECONDS / 4}", "checkpoint.every_seconds=" +
                    str(SECONDS / 3), "mailbox.checksum=true", "output.progress=false",
                    timeout=SECONDS + 240)
    assert result.returncode == 0, result.stderr[-3000:]
    folder = tmp_path / "soak"
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["exit"] == "finished" and len(summary["iterations"]) == RANKS
    assert min(summary["iterations"]) > 0, "every rank trained"
    stats = summary["mailbox"]
    assert sum(s["reads"] for s in stats) > 1000
    assert sum(s["corrupt"] for s in stats) == 0, "a copy failed its checksum"
    for rank in range(RANKS):
        rss = [r["rss_mb"] for r in read_lines(folder / f"rank-{rank:05d}.jsonl") if "rss_mb" in r]
        quarter = len(rss) // 4
        settled, end = np.median(rss[quarter:2 * quarter]), np.median(rss[-quarter:])
        assert end - settled <= max(8.0, 0.03 * settled), \
            f"rank {rank} grew from {settled:.0f} MB to {end:.0f} MB"
