"""Interrupted runs resume exactly; same seed, same result; checkpoints are atomic."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).parent / "scripts"


def _run(script, *args, expect_kill=False):
    proc = subprocess.run([sys.executable, str(SCRIPTS / script), *map(str, args)], capture_output=True, text=True, timeout=300)
    if expect_kill:
        assert proc.returncode == -9, proc.stderr[-2000:]
    else:
        assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
def test_ctr_sigkill_resume_equals_uninterrupted(tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    _run("resume_ctr.py", full, -1, 0)
    _run("resume_ctr.py", cut, 11, 0, expect_kill=True)  # killed mid-epoch 2 (9 steps per epoch)
    ckpt = torch.load(cut / "ckpt" / "last.ckpt", weights_only=True)
    assert 0 < ckpt["global_step"] < 27  # a mid-run checkpoint exists
    _run("resume_ctr.py", cut, -1, 1)
    a = torch.load(full / "final.pt", weights_only=True)
    b = torch.load(cut / "final.pt", weights_only=True)
    assert a.keys() == b.keys()
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f"resumed run differs in {diff}"


def test_atomic_checkpoint_never_leaves_a_torn_file(tmp_path, monkeypatch):
    from rechub_lightning.checkpoint import AtomicCheckpointIO

    io = AtomicCheckpointIO()
    path = tmp_path / "x.ckpt"
    io.save_checkpoint({"a": torch.ones(3)}, path)

    def boom(*args, **kwargs):
        raise KeyboardInterrupt  # stands in for a kill in the middle of writing

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"a": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(3))  # old file intact
    assert [p.name for p in tmp_path.iterdir()] == ["x.ckpt"]  # no temporary left behind


@pytest.mark.slow
def test_same_seed_bitwise_equal_state_dicts(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _run("resume_ctr.py", a, -1, 0)
    _run("resume_ctr.py", b, -1, 0)
    sa, sb = torch.load(a / "final.pt", weights_only=True), torch.load(b / "final.pt", weights_only=True)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
