"""Every script in examples/ runs as it is (on small data)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.py"))


@pytest.mark.slow
@pytest.mark.parametrize("script", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_runs(script, tmp_path):
    env = {**os.environ, "EXAMPLE_ROWS": "4000", "EXAMPLE_EPOCHS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # each example ends by printing a metric it computed
    assert re.search(r"(auc|recall|hit|ndcg)\S*\W+\s*0\.\d+", proc.stdout, re.I), proc.stdout[-1500:]
