"""SIGKILL at random points of a tiny training run; every resume ends exactly where an uninterrupted run ends.

Kill points fall anywhere in a run of ~10 s: mid-step, mid-checkpoint-write (a checkpoint after every
optimizer step), mid-evaluation, mid-calibration and mid-final-write. A killed run is resumed (and may be
killed again) until it finishes; its final weights and metrics must equal the uninterrupted run's.
"""

from __future__ import annotations

import csv
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

SMOKE = Path(__file__).resolve().parents[1] / "recipes" / "smoke" / "synthetic_tiny_ds_resnet.yaml"
SETS = ["--set", "optim.epochs=2", "--set", "data.synthetic_train_size=96", "--set", "supernet.checkpoint_every=1"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
KILLS = 20


def _cmd(out: Path, resume: bool) -> list[str]:
    where = ["--resume", str(out)] if resume else ["--out", str(out)]
    return [sys.executable, "-m", "dsctl", "train-supernet", str(SMOKE), *where, "--device", "cpu", "-q", *SETS]


def _metrics(out: Path) -> list[dict[str, str]]:
    with (out / "metrics.csv").open() as f:
        return [{k: v for k, v in r.items() if k != "epoch_s"} for r in csv.DictReader(f)]  # timings differ


def _final(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "final.pt", weights_only=True)["state_dict"]


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    ref = tmp_path / "ref"
    t0 = time.monotonic()
    subprocess.run(_cmd(ref, False), env=ENV, check=True, capture_output=True, timeout=600)
    duration = time.monotonic() - t0
    rng = random.Random(0)
    kills = 0
    trial = 0
    while kills < KILLS and trial < 3 * KILLS:  # until 20 kills happened (a kill time past the run's end kills nothing)
        trial += 1
        out = tmp_path / f"k{trial}"
        resume = False
        for attempt in range(6):  # kill, resume, maybe kill again, ... until it finishes
            started = time.monotonic()
            proc = subprocess.Popen(_cmd(out, resume), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            if attempt < 2:
                try:
                    proc.wait(timeout=rng.uniform(0.2, 0.95) * duration)
                    if not resume:  # a whole run finished first: the machine got faster, aim earlier
                        duration = min(duration, time.monotonic() - started)
                except subprocess.TimeoutExpired:
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                    kills += 1
            else:
                proc.wait(timeout=600)
            if (out / "final.pt").is_file() and proc.returncode == 0:
                break
            resume = out.exists() and any(out.rglob("last.pt"))
        assert (out / "final.pt").is_file(), f"trial {trial}: never finished"
        a, b = _final(ref), _final(out)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"trial {trial}: {k} differs after resume"
        assert _metrics(out) == _metrics(ref), f"trial {trial}: metrics differ after resume"
    assert kills >= KILLS
