"""Tests of train.py under torchrun: 2 CPU processes (gloo) against 1, on a tiny random LLaMA,
with DDP and with FSDP2. Each distributed run is one torchrun launch of train.main (through a
small script that counts clustering calls and stops the run at a chosen micro-step); the one-
process runs happen in this process.

    pytest tests/test_distributed.py

--dropout 0 throughout: each rank draws its own dropout masks, so with dropout the runs would
differ by their masks, not by a mistake. The learning rate is low (5e-3) because AdamW divides
each gradient by its own root mean square: on the router's tiny gradients a 1e-7 difference in
summation order becomes a visible difference in the update at high learning rates.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import idlora
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Run train.main as train.py would, but log each clustering call with its rank, and at micro-step
# STOP_AT of rank 0 either press Ctrl-C (SIGINT to torchrun, as a terminal does) or die by SIGKILL.
LAUNCHER = """
import os, signal, sys, time
import idlora, train

real_cluster, real_loss, calls = idlora.cluster_rows, train.response_loss_sum, [0]

def cluster_rows(*a, **kw):
    with open(os.environ["CLUSTER_LOG"], "a") as f:
        f.write(f"{train.RANK}\\n")
    return real_cluster(*a, **kw)

def response_loss_sum(*a):
    calls[0] += 1
    if train.RANK == 0 and calls[0] == int(os.environ["STOP_AT"]):
        if os.environ["HOW"] == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        # Ctrl-C goes to torchrun, which passes it to the ranks: wait until it is here, so the
        # run stops after this step whatever the machine's load.
        got, handler = [], signal.getsignal(signal.SIGINT)
        signal.signal(signal.SIGINT, lambda *s: (handler(*s), got.append(1)))
        os.kill(os.getppid(), signal.SIGINT)
        deadline = time.time() + 60
        while not got and time.time() < deadline:
            time.sleep(0.01)
    return real_loss(*a)

idlora.cluster_rows, train.response_loss_sum = cluster_rows, response_loss_sum
train.main(sys.argv[1:])
"""


def args(model_dir, data_dir, out, *extra):
    # 13 examples, batch 8: an epoch is a batch of 8 and one of 5, and 4 steps cross an epoch.
    # Micro-batches of 2: one process makes 4 passes in a full batch, each of 2 ranks makes 2
    # (gradient sync on the second only). Of the 5, one process makes passes of 2, 2 and 1: rank
    # 0 takes the two of 2, rank 1 the one of 1 and one multiplied by 0. Gradient checkpointing
    # is on (the default).
    return ["--task", "gsm8k", "--model", model_dir, "--data-dir", data_dir, "--output-dir", str(out), "--max-examples", "13",
            "--rank", "8", "--k", "2", "--selection", "cluster", "--cluster-cache", "", "--batch-size", "8",
            "--micro-batch-size", "2", "--max-len", "64", "--lr", "5e-3", "--dropout", "0", "--max-steps", "4",
            *extra]


def torchrun(tmp_path, argv, stop_at, how):
    """2 processes; returns (torchrun's return code, its output, the ranks that clustered)."""
    script, log = tmp_path / "launch.py", tmp_path / "clustered.txt"
    script.write_text(LAUNCHER)
    log.unlink(missing_ok=True)
    env = dict(os.environ, PYTHONPATH=ROOT, CLUSTER_LOG=str(log), STOP_AT=str(stop_at), HOW=how)
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(script), *argv],
                       env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    ranks = log.read_text().split() if log.exists() else []
    return p.returncode, p.stdout + p.stderr, ranks


def metrics(out):
    return [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]


def state(out):
    return torch.load(os.path.join(out, "state.pt"), weights_only=False)


def assert_same_checkpoint(got_dir, ref, step):
    """The adapter file within 1e-6 of one process's at `step`, the same keys, dtypes and
    settings; and AdamW's first moments (a running mean of the gradients themselves, whose
    scale AdamW's update hides: it divides it out) within 1e-5 of their largest value."""
    path = os.path.join(got_dir, "adapter.safetensors")
    assert idlora.read_adapter_config(path) == ref[step]["config"]
    a, b = load_file(path), ref[step]["adapter"]
    assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a if k.endswith(".idx"))          # the same rows
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    s, r = state(got_dir), ref[step]["state"]
    assert s["step"] == step and s["opt"]["state"].keys() == r["opt"]["state"].keys()
    for i, moments in r["opt"]["state"].items():
        m = s["opt"]["state"][i]["exp_avg"]
        assert type(m) is torch.Tensor and m.shape == moments["exp_avg"].shape      # gathered, not a shard
        assert (m - moments["exp_avg"]).abs().max() <= 1e-5 * moments["exp_avg"].abs().max()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir, gsm8k_dir):
    """One process, 4 uninterrupted steps, checkpointing every step: {step: adapter tensors and
    state.pt}, and its metrics rows."""
    out = tmp_path_factory.mktemp("one") / "run"
    real, kept = train.save_checkpoint, {}

    def save_and_keep(o, model, tok, opt, sched, step, method):
        real(o, model, tok, opt, sched, step, method)
        path = os.path.join(o, "adapter.safetensors")
        kept[step] = dict(adapter=load_file(path), config=idlora.read_adapter_config(path), state=state(o))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train, "save_checkpoint", save_and_keep)
        train.main(args(tiny_model_dir, gsm8k_dir, out, "--save-every", "1"))
    return kept, metrics(out)


def test_ddp_ctrl_c_then_fsdp_resume(tmp_path, tiny_model_dir, gsm8k_dir, reference):
    """DDP on 2 processes; Ctrl-C during step 3 saves step 3 once; FSDP on 2 processes resumes
    from that checkpoint (each rank takes its shard of the full AdamW state) and finishes."""
    ref, ref_rows = reference
    out = tmp_path / "run"
    code, log, clustered = torchrun(tmp_path, args(tiny_model_dir, gsm8k_dir, out, "--save-every", "100"),
                                    stop_at=5, how="sigint")                       # 2 micro-steps a step
    assert code != 0 and log.count("interrupted: saved step 3") == 1, log[-3000:]
    assert clustered == ["0"] * 14                        # 2 layers x 7 projections, on rank 0 only
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in ref_rows[:3]], abs=1e-5)
    assert_same_checkpoint(out, ref, 3)

    code, log, clustered = torchrun(tmp_path, args(tiny_model_dir, gsm8k_dir, out, "--resume", "--parallel", "fsdp"),
                                    stop_at=0, how="")
    assert code == 0, log[-3000:]
    assert clustered == []                                # the row indices come from the checkpoint
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in ref_rows], abs=1e-5)
    assert_same_checkpoint(out, ref, 4)
    saved = json.load(open(out / "args.json"))          # the run's settings kept, the change recorded
    assert (saved["parallel"], saved["world"]) == ("ddp", 2)
    assert [(r["step"], r["world"], r["changed"]) for r in saved["resumes"]] == [(3, 2, {"parallel": ["ddp", "fsdp"]})]


def test_fsdp_sigkill_then_one_process_resume(tmp_path, tiny_model_dir, gsm8k_dir, reference):
    """FSDP on 2 processes, checkpoint at step 2, then rank 0 is killed with SIGKILL during step 4
    (no Ctrl-C, nothing saved). The gathered checkpoint is one process's format; one process
    resumes it, metrics.jsonl is cut back to step 2 first, and the run ends as the reference."""
    ref, ref_rows = reference
    out = tmp_path / "run"
    code, log, clustered = torchrun(tmp_path, args(tiny_model_dir, gsm8k_dir, out, "--parallel", "fsdp",
                                                   "--save-every", "2"), stop_at=7, how="sigkill")
    assert code != 0 and "exitcode: -9" in log, log[-3000:]
    assert clustered == ["0"] * 14
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3]                      # step 3 logged, not saved
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in ref_rows[:3]], abs=1e-5)
    assert_same_checkpoint(out, ref, 2)

    train.main(args(tiny_model_dir, gsm8k_dir, out, "--resume"))
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]                  # not 1, 2, 3, 3, 4
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in ref_rows], abs=1e-5)
    assert_same_checkpoint(out, ref, 4)
    saved = json.load(open(out / "args.json"))
    assert (saved["parallel"], saved["world"], saved["save_every"]) == ("fsdp", 2, 2)
    assert [(r["step"], r["world"], r["changed"]) for r in saved["resumes"]] == [
        (2, 1, {"save_every": [2, 100], "parallel": ["fsdp", None]})]


def test_ddp_on_a_4bit_base_makes_one_process_update(tmp_path, tiny_model_dir, gsm8k_dir):
    """--quantize nf4 under DDP (2 processes): every rank quantizes its base alike (the 4-bit codes are
    buffers, copied from rank 0 when DDP starts), and the losses and adapter are one process's."""
    one = tmp_path / "one"
    train.main(args(tiny_model_dir, gsm8k_dir, one, "--quantize", "nf4", "--max-steps", "2"))
    out = tmp_path / "ddp"
    code, log, _ = torchrun(tmp_path, args(tiny_model_dir, gsm8k_dir, out, "--quantize", "nf4", "--max-steps", "2"),
                            stop_at=0, how="")
    assert code == 0, log[-3000:]
    assert [r["loss"] for r in metrics(out)] == pytest.approx([r["loss"] for r in metrics(one)], abs=1e-5)
    a, b = load_file(os.path.join(out, "adapter.safetensors")), load_file(os.path.join(one, "adapter.safetensors"))
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    assert idlora.read_adapter_config(os.path.join(out, "adapter.safetensors"))["quantize"] == "nf4"


def test_rank_shares_and_batch_split_errors(monkeypatch, capsys):
    assert [train.rank_share(list(range(8)), 2, r, 2) for r in range(2)] == [[[0, 1], [2, 3]], [[4, 5], [6, 7]]]
    # an epoch's short last batch: one process's micro-batches [0 1] [2 3] [4], shared out whole
    assert [train.rank_share(list(range(5)), 2, r, 2) for r in range(2)] == [[[0, 1], [2, 3]], [[4]]]
    parts = [train.rank_share(list(range(17)), 2, r, 4) for r in range(4)]
    assert [len(p) for p in parts] == [3, 2, 2, 2] and sum(sum(parts, []), []) == list(range(17))
    assert train.rank_share(list(range(3)), 1, 3, 4) == []                # fewer examples than ranks

    monkeypatch.setenv("RANK", "0")                                       # as under torchrun
    monkeypatch.setattr(train, "WORLD", 2)
    assert train.parse_args([]).parallel == "ddp"                         # the default with 2 processes
    for argv, msg in [(["--batch-size", "6", "--micro-batch-size", "2"],
                       "--batch-size 6 cannot be split evenly into 2 processes x --micro-batch-size 2: make it a multiple of 4"),
                      (["--parallel", "fsdp", "--method", "full"], "--parallel fsdp trains adapters")]:
        with pytest.raises(SystemExit):
            train.parse_args(argv)
        assert msg in capsys.readouterr().err
    monkeypatch.delenv("RANK")
    with pytest.raises(SystemExit):
        train.parse_args(["--parallel", "fsdp"])
    assert "--parallel fsdp needs torchrun" in capsys.readouterr().err
