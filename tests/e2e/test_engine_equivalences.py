"""Engine guarantees: resume equals uninterrupted; accumulation equals a bigger batch; 2 DDP ranks
equal 1 process with the doubled batch; the logged loss equals Hugging Face's own loss."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

from tokentune.cli import main
from tests.e2e.helpers import losses, write_config


def test_resume_equals_uninterrupted(tmp_path):
    cfg = write_config(tmp_path, train={"max_steps": 6, "save_every": 3, "keep_checkpoints": 5},
                       adapter={"dropout": 0.1})
    assert main(["train", str(cfg)]) == 0
    full = losses(tmp_path / "run")
    # Simulate a run killed right after step 3: drop everything written later.
    run = tmp_path / "run"
    shutil.rmtree(run / "final")
    for name in ["summary.json", "report.html"]:
        (run / name).unlink()
    assert main(["train", str(cfg), "--resume"]) == 0
    assert losses(run) == full
    assert len(full) == 6


def test_grad_accum_equals_bigger_batch(tmp_path):
    a = write_config(tmp_path / "a", train={"batch_size": 4, "grad_accum": 1, "max_steps": 4})
    b = write_config(tmp_path / "b", train={"batch_size": 2, "grad_accum": 2, "max_steps": 4})
    assert main(["train", str(a)]) == 0 and main(["train", str(b)]) == 0
    la, lb = losses(tmp_path / "a" / "run"), losses(tmp_path / "b" / "run")
    assert la == pytest.approx(lb, rel=1e-5)


def test_logged_loss_equals_hf_loss_at_step_one(tmp_path):
    """Independent reference: the mean next-token loss transformers computes over the same records."""
    from transformers import AutoModelForCausalLM

    from tokentune.config import load_config
    from tokentune.engine.batching import Schedule
    from tokentune.engine.distributed import DistEnv
    from tokentune.engine.session import build_session

    cfg_path = write_config(tmp_path, train={"max_steps": 1}, data={"packing": False})
    assert main(["train", str(cfg_path)]) == 0
    logged = losses(tmp_path / "run")[0]
    session = build_session(load_config(cfg_path), DistEnv())
    rows = session.train_rows()
    picked = Schedule(len(rows), 4, 1, 1).micro_batches(0, 0, 0, 0)[0]
    model = AutoModelForCausalLM.from_pretrained(session.ref)
    total, count = 0.0, 0
    for i in picked:
        ex = rows[i]
        labels = torch.tensor([ex.labels])
        n = int((labels[:, 1:] != -100).sum())
        total += float(model(input_ids=torch.tensor([ex.input_ids]), labels=labels).loss) * n
        count += n
    assert logged == pytest.approx(total / count, rel=1e-5)


@pytest.mark.distributed
def test_two_ranks_equal_one_process_with_double_batch(tmp_path):
    one = write_config(tmp_path / "one", train={"batch_size": 4, "max_steps": 4})
    two = write_config(tmp_path / "two", train={"batch_size": 2, "max_steps": 4})
    assert main(["train", str(one)]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           "-m", "tokentune.cli", "train", str(two)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert losses(tmp_path / "two" / "run") == pytest.approx(losses(tmp_path / "one" / "run"), rel=1e-5)
