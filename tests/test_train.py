"""Tests of train.py: label masking, the multitask mix, a few real steps on a tiny random
LLaMA (loss falls, checkpoints, exact resume, a resume that changes the run refused, Ctrl-C,
NaN refusal, bf16), clear errors for bad settings and bad data, and two steps of the embedded
model on GSM8K.

    pytest test_train.py
"""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

import idlora
import train


def run(tmp_path, model_dir, data_dir, *extra):
    """A short run: ID-LoRA r=8 k=2 (random rows, dropout 0.1) unless `extra` names a --method,
    which then brings its own settings."""
    out = str(tmp_path / "run")
    settings = [] if "--method" in extra else ["--rank", "8", "--k", "2", "--selection", "random", "--dropout", "0.1"]
    train.main(["--task", "gsm8k", "--model", model_dir, "--data-dir", data_dir, "--output-dir", out,
                "--batch-size", "8", "--micro-batch-size", "4", "--max-len", "64", "--lr", "5e-2", *settings, *extra])
    return out


def metrics(out):
    return [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]


# -----------------------------------------------------------------------------
# Data pipeline


def test_label_masking_and_padding(tok):
    prompt = train.format_prompt("What is 2 + 3?")
    ids, labels = train.encode(tok, prompt, "2 + 3 = 5\n#### 5", max_len=512)
    p = tok(prompt).input_ids
    r = tok("2 + 3 = 5\n#### 5", add_special_tokens=False).input_ids
    assert ids == p + r + [tok.eos_token_id]
    assert labels == [-100] * len(p) + r + [tok.eos_token_id]        # prompt masked, response + eos kept
    short = train.encode(tok, prompt, "5", max_len=512)
    x, y, mask = train.collate([(ids, labels), short], pad_id=tok.pad_token_id)
    n = len(short[0])
    assert x.shape == y.shape == mask.shape == (2, len(ids))
    assert (y[1, n:] == -100).all() and (mask[1, n:] == 0).all() and (mask[1, :n] == 1).all()
    assert y[1, :n].tolist() == short[1]
    # truncation keeps the first max_len tokens
    ids8, labels8 = train.encode(tok, prompt, "2 + 3 = 5\n#### 5", max_len=len(p) + 2)
    assert ids8 == (p + r)[:len(p) + 2] and labels8[-2:] == r[:2]


def test_heldout_loss_is_mean_response_nll(tok):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    # prompts of different lengths: the logits kept start at the earliest response in a batch
    pairs = [(train.format_prompt(f"q{i}" + " more" * (3 * i % 5)), "a" * (i + 1)) for i in range(5)]
    got = train.heldout_loss(model, tok, pairs, batch_size=2)
    # one example at a time, by hand: logits of each response token given everything before it
    total, n = 0.0, 0
    for p, r in pairs:
        ids, labels = train.encode(tok, p, r, 512)
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].float(), -1)
        for t in range(len(ids) - 1):
            if labels[t + 1] != -100:
                total -= logp[t, labels[t + 1]].item()
                n += 1
    assert got == pytest.approx(total / n, rel=1e-5)


def test_train_file_replaces_the_task_data(tmp_path, tiny_model_dir, gsm8k_dir):
    path = tmp_path / "mix.jsonl"
    records = [{"instruction": f"Say {i}", "output": str(i)} for i in range(6)] + \
              [{"question": "What is 1 plus 1?", "answer": "#### 2"}] * 2
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = run(tmp_path, tiny_model_dir, gsm8k_dir, "--train-file", str(path), "--batch-size", "4", "--epochs", "1")
    assert [r["step"] for r in metrics(out)] == [1, 2]                  # 8 records, not gsm8k's 16
    assert train.read_jsonl(str(path))[0] == {"input": "", "instruction": "Say 0", "output": "0"}


def test_multitask_mix_proportions(monkeypatch):
    sources = {"alpaca": 100, "gsm8k": 50, "codealpaca": 41}

    def fake_load(name, split, data_dir=None):
        return [{"src": name, "i": i} for i in range(sources[name])]

    monkeypatch.setattr(train.data, "load", fake_load)
    mix = train.task_records("multitask", seed=0)
    counts = {n: sum(r["src"] == n for r in mix) for n in sources}
    assert counts == {"alpaca": 100, "gsm8k": 50, "codealpaca": 20}       # all, all, half
    code = [r["i"] for r in mix if r["src"] == "codealpaca"]
    assert len(set(code)) == 20 and code != list(range(20))                # a random half, no repeats
    assert code != [r["i"] for r in train.task_records("multitask", seed=1) if r["src"] == "codealpaca"]


def test_multitask_names_the_missing_part(monkeypatch):
    def fake_load(name, split, data_dir=None):
        if name == "alpaca":
            raise FileNotFoundError("alpaca is hub-only")
        return [{"src": name}]

    monkeypatch.setattr(train.data, "load", fake_load)
    with pytest.raises(FileNotFoundError, match="--task multitask needs alpaca, which is missing: alpaca is hub-only"):
        train.task_records("multitask")


# -----------------------------------------------------------------------------
# The loop on a tiny random LLaMA


def test_loss_falls_and_adapter_is_written(tmp_path, tiny_model_dir, gsm8k_dir, capsys):
    out = run(tmp_path, tiny_model_dir, gsm8k_dir, "--max-steps", "12")
    printed = capsys.readouterr()
    assert "12 optimizer steps of 8 examples to go (on a CPU" in printed.out      # before it starts
    took = re.search(r"the first step took (\d+) s: about ([\d.]+) h for the other 11", printed.out + printed.err)
    assert took and float(took[2]) == pytest.approx(int(took[1]) * 11 / 3600, abs=0.051)
    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.2, [r["loss"] for r in rows]   # from ln(vocab) = 10.8
    assert rows[0]["lr"] == 5e-2 and rows[-1]["lr"] == pytest.approx(5e-2 / 12)   # linear decay, no warmup
    for f in ("adapter.safetensors", "state.pt", "loss.png", "args.json"):
        assert os.path.exists(os.path.join(out, f)), f
    assert torch.load(os.path.join(out, "state.pt"), weights_only=False)["step"] == 12


def test_compile_trains_as_eager_does(tmp_path, tiny_model_dir, gsm8k_dir):
    """--compile (each decoder layer through torch.compile: inductor's C++ on the CPU) runs 2 steps with
    gradient checkpointing, and its losses are eager's: the same computation. Dropout 0, because
    compiled code draws its masks from another generator; 8 examples of one length, so one compilation
    serves both steps (a new padded length compiles again: about a minute here)."""
    flags = ["--max-steps", "2", "--batch-size", "4", "--micro-batch-size", "4", "--max-examples", "8", "--dropout", "0"]
    eager = metrics(run(tmp_path / "eager", tiny_model_dir, gsm8k_dir, *flags))
    compiled = metrics(run(tmp_path / "compiled", tiny_model_dir, gsm8k_dir, *flags, "--compile"))
    assert [r["step"] for r in compiled] == [1, 2]
    assert [r["loss"] for r in compiled] == pytest.approx([r["loss"] for r in eager], rel=1e-4)
    assert compiled[1]["loss"] < compiled[0]["loss"]                      # the second step saw the update


def test_kmeans_flags_reach_pmrc_and_its_cache_key(tmp_path, tiny_model_dir, gsm8k_dir, monkeypatch, capsys):
    calls = []
    real = idlora.cluster_rows
    monkeypatch.setattr(idlora, "cluster_rows", lambda *a: calls.append(a[3:]) or real(*a))
    cache = str(tmp_path / "rows")
    for i, (inits, iters) in enumerate(((2, 3), (2, 3), (1, 3))):
        train.main(["--task", "gsm8k", "--model", tiny_model_dir, "--data-dir", gsm8k_dir, "--output-dir",
                    str(tmp_path / f"run{i}"), "--rank", "8", "--k", "2", "--batch-size", "4", "--micro-batch-size", "4",
                    "--max-len", "64", "--max-steps", "1", "--cluster-cache", cache,
                    "--kmeans-inits", str(inits), "--kmeans-iters", str(iters)])
    # (selection, seed, n_init, max_iter) of every clustering: 14 matrices, then none (cached), then 14 again
    assert calls == [("cluster", 0, 2, 3)] * 14 + [("cluster", 0, 1, 3)] * 14
    with pytest.raises(SystemExit):
        train.parse_args(["--kmeans-iters", "0"])
    assert "--kmeans-iters must be at least 1" in capsys.readouterr().err


RESUMED = {"idlora": ["--rank", "8", "--k", "2", "--selection", "random", "--dropout", "0.1", "--lr", "5e-2"],
           "hydralora": ["--rank", "4", "--k", "3", "--dropout", "0.1", "--lr", "5e-2"],
           # on a 4-bit base: DoRA keeps its W0 terms between steps (rebuilt on resume), dropout's path reads W0
           "dora": ["--rank", "4", "--dropout", "0.1", "--lr", "5e-2", "--quantize", "nf4"],
           "full": ["--lr", "1e-3"]}


@pytest.mark.parametrize("method", list(RESUMED))
def test_resume_after_interrupt_matches_an_uninterrupted_run(tmp_path, tiny_model_dir, gsm8k_dir, monkeypatch, method):
    m = ["--method", method, *RESUMED[method]]
    whole = run(tmp_path / "a", tiny_model_dir, gsm8k_dir, "--max-steps", "6", *m)

    # Ctrl-C in the middle of step 4: the run saves step 3 and exits with a message.
    real, calls = train.response_loss_sum, []

    def interrupt(*a):
        calls.append(1)
        if len(calls) == 7:                      # 2 micro-batches per step: the 1st of step 4
            raise KeyboardInterrupt
        return real(*a)

    monkeypatch.setattr(train, "response_loss_sum", interrupt)
    with pytest.raises(SystemExit, match="interrupted: saved step 3"):
        run(tmp_path / "b", tiny_model_dir, gsm8k_dir, "--max-steps", "6", "--save-every", "100", *m)
    monkeypatch.setattr(train, "response_loss_sum", real)
    out = str(tmp_path / "b" / "run")
    state = torch.load(os.path.join(out, "state.pt"), weights_only=False)
    assert state["step"] == 3 and len(state["opt"]["state"]) > 0          # AdamW moments saved

    with pytest.raises(SystemExit, match="already holds a run"):            # never overwrite silently
        run(tmp_path / "b", tiny_model_dir, gsm8k_dir, "--max-steps", "6", *m)
    run(tmp_path / "b", tiny_model_dir, gsm8k_dir, "--max-steps", "6", "--resume", *m)
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4, 5, 6]
    assert all(r["seconds"] > 0 for r in metrics(out))     # each step's own time: the log sums to the whole run's
    assert [r["loss"] for r in metrics(out)] == pytest.approx([r["loss"] for r in metrics(whole)], rel=1e-5)
    f = os.path.join("model", "model.safetensors") if method == "full" else "adapter.safetensors"
    a, b = load_file(os.path.join(whole, f)), load_file(os.path.join(out, f))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


# A resume is the same run or none: every setting that shapes the update must be the run's.

BASE = ["--task", "gsm8k", "--batch-size", "8", "--micro-batch-size", "4", "--max-len", "64", "--lr", "5e-2",
        "--rank", "8", "--k", "2", "--selection", "random", "--dropout", "0.1", "--save-every", "1"]


def base_argv(model_dir, data_dir, out, *extra):
    """BASE with --model, --data-dir, --output-dir; each flag of `extra` replaces BASE's value or adds one."""
    argv = BASE + ["--model", model_dir, "--data-dir", data_dir, "--output-dir", out]
    for flag, value in zip(extra[::2], extra[1::2]):
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    return argv


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory, tiny_model_dir, gsm8k_dir):
    """A finished 2-step run (a checkpoint at each step), to be copied by each test."""
    out = str(tmp_path_factory.mktemp("two") / "run")
    train.main(base_argv(tiny_model_dir, gsm8k_dir, out, "--max-steps", "2"))
    return out


def copy_run(src, tmp_path):
    return shutil.copytree(src, str(tmp_path / "run"))


def snapshot(out):
    """Every file under `out`: its bytes and its modification time (ns)."""
    files = {}
    for root, _, names in os.walk(out):
        for n in names:
            path = os.path.join(root, n)
            files[os.path.relpath(path, out)] = (open(path, "rb").read(), os.stat(path).st_mtime_ns)
    return files


def refusal(tmp_path, two_steps, tiny_model_dir, gsm8k_dir, *change):
    """Resume a copy of the 2-step run with `change`: the refusal's lines after the first; no file may change."""
    out = copy_run(two_steps, tmp_path)
    before = snapshot(out)
    with pytest.raises(SystemExit) as e:
        train.main(base_argv(tiny_model_dir, gsm8k_dir, out, "--max-steps", "2", *change) + ["--resume"])
    assert snapshot(out) == before                       # not a byte, not an mtime
    first, *lines = str(e.value).splitlines()
    assert first == (f"error: --resume refused: these settings differ from the run's in {out}/args.json (pass the "
                     "run's values, or start a new run in another --output-dir)")
    return lines


def test_a_resume_that_changes_the_update_is_refused(tmp_path, two_steps, tiny_model_dir, gsm8k_dir):
    other = tmp_path / "other"
    os.makedirs(other / "gsm8k")
    (other / "gsm8k" / "train.jsonl").write_text(open(os.path.join(gsm8k_dir, "gsm8k", "train.jsonl")).read())
    (tmp_path / "mine.jsonl").write_text('{"question": "q", "answer": "a"}\n')
    for i, (change, lines) in enumerate([
            (["--lr", "1e-3"], ["--lr: run has 0.05, resume asks 0.001"]),
            (["--rank", "4"], ["--rank: run has 8, resume asks 4", "--alpha: run has 16.0, resume asks 8.0"]),
            (["--seed", "1"], ["--seed: run has 0, resume asks 1"]),
            (["--batch-size", "4"], ["--batch-size: run has 8, resume asks 4"]),
            (["--micro-batch-size", "2"], ["--micro-batch-size: run has 4, resume asks 2"]),
            (["--max-len", "128"], ["--max-len: run has 64, resume asks 128"]),
            (["--data-dir", str(other)], [f"--data-dir: run has {gsm8k_dir}, resume asks {other}"]),
            (["--train-file", str(tmp_path / "mine.jsonl")], [f"--train-file: run has unset, resume asks {tmp_path}/mine.jsonl"]),
            (["--epochs", "5"], ["--epochs: run has 3, resume asks 5.0"]),
            (["--kmeans-iters", "5"], ["--kmeans-iters: run has 20, resume asks 5"]),
            # an allowed change beside a refused one: still refused, and only the refused one is named
            (["--lr", "1e-3", "--save-every", "5", "--max-steps", "4"], ["--lr: run has 0.05, resume asks 0.001"])]):
        assert refusal(tmp_path / str(i), two_steps, tiny_model_dir, gsm8k_dir, *change) == lines, change
    # --dtype and --device also change what auto means on a CPU without bf16 (a second line there)
    for i, (change, line) in enumerate([(["--dtype", "bf16"], "--dtype: run has auto, resume asks bf16"),
                                        (["--device", "cuda"], "--device: run has cpu, resume asks cuda")]):
        assert refusal(tmp_path / f"d{i}", two_steps, tiny_model_dir, gsm8k_dir, *change)[0] == line, change


def test_a_resume_on_a_machine_where_dtype_auto_means_another_dtype_is_refused(tmp_path, two_steps, tiny_model_dir,
                                                                                gsm8k_dir):
    """--dtype auto is bf16 on a CPU with native bf16 matmuls and float32 elsewhere: the same flags on
    another machine would train on in another dtype. args.json records the dtype the run trained in."""
    out = copy_run(two_steps, tmp_path)
    saved = json.load(open(os.path.join(out, "args.json")))
    here = saved["base_dtype"]
    assert here == train.base_dtype(train.parse_args(base_argv(tiny_model_dir, gsm8k_dir, out)))
    other = "float32" if here == "bfloat16" else "bfloat16"
    saved["base_dtype"] = other                           # as if it had started on the other kind of CPU
    json.dump(saved, open(os.path.join(out, "args.json"), "w"))
    before = snapshot(out)
    with pytest.raises(SystemExit) as e:
        train.main(base_argv(tiny_model_dir, gsm8k_dir, out, "--max-steps", "2") + ["--resume"])
    assert str(e.value).splitlines()[1:] == [f"--dtype auto: the run trained in {other}, here it means {here}"]
    assert snapshot(out) == before


def test_a_resume_that_changes_the_method_is_refused(tmp_path, two_steps, tiny_model_dir, gsm8k_dir):
    out = copy_run(two_steps, tmp_path)
    before = snapshot(out)
    with pytest.raises(SystemExit) as e:        # what the user did: LoRA's flags on ID-LoRA's run
        train.main(["--task", "gsm8k", "--model", tiny_model_dir, "--data-dir", gsm8k_dir, "--output-dir", out,
                    "--batch-size", "8", "--micro-batch-size", "4", "--max-len", "64", "--lr", "5e-2", "--method", "lora",
                    "--rank", "8", "--dropout", "0.1", "--save-every", "1", "--max-steps", "2", "--resume"])
    assert snapshot(out) == before
    assert str(e.value).splitlines()[1:] == ["--method: run has idlora, resume asks lora", "--k: run has 2, resume asks unset",
                                             "--boost: run has 2, resume asks unset",
                                             "--selection: run has random, resume asks unset"]


def test_a_resume_that_extends_max_steps_continues_and_is_recorded(tmp_path, two_steps, tiny_model_dir, gsm8k_dir, capsys):
    out = copy_run(two_steps, tmp_path)
    started = json.load(open(os.path.join(out, "args.json")))
    assert (started["max_steps"], started["world"], started["resumes"]) == (2, 1, [])
    train.main(base_argv(tiny_model_dir, gsm8k_dir, out, "--max-steps", "4") + ["--resume"])
    assert "changed, and recorded in args.json: --max-steps 2 -> 4" in capsys.readouterr().out
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    # the linear decay is recomputed over the new total: step 3 runs at 5e-2 * (1 - 2/4)
    assert [r["lr"] for r in rows] == pytest.approx([5e-2, 5e-2 / 2, 5e-2 / 2, 5e-2 / 4])
    # a second resume compares with the run as the first left it (4 steps), and records only its own change
    train.main(base_argv(tiny_model_dir, gsm8k_dir, out, "--max-steps", "4", "--save-every", "2") + ["--resume"])
    saved = json.load(open(os.path.join(out, "args.json")))
    resumes = saved.pop("resumes")
    assert saved == {k: v for k, v in started.items() if k != "resumes"}          # the run's settings, as they were
    # (the copy also moved the run: its new folder is recorded once, as the run's from then on)
    assert [(r["step"], r["world"], r["changed"]) for r in resumes] == [
        (2, 1, {"max_steps": [2, 4], "output_dir": [two_steps, out]}), (4, 1, {"save_every": [1, 2]})]
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d", r["date"]) for r in resumes)
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4]


def test_runs_from_before_the_check_still_resume(tmp_path, two_steps, tiny_model_dir, gsm8k_dir, capsys):
    """An args.json written before "world", "resumes" and a later flag (here --kmeans-iters) existed:
    the missing flag ran as its default, so the default resumes and another value refuses."""
    out = copy_run(two_steps, tmp_path / "old")
    old = json.load(open(os.path.join(out, "args.json")))
    for key in ("world", "resumes", "kmeans_iters"):
        del old[key]
    with open(os.path.join(out, "args.json"), "w") as f:
        json.dump(old, f, indent=1)
    with pytest.raises(SystemExit, match="--kmeans-iters: run has 20, resume asks 5"):
        train.main(base_argv(tiny_model_dir, gsm8k_dir, out, "--max-steps", "3", "--kmeans-iters", "5") + ["--resume"])
    train.main(base_argv(tiny_model_dir, gsm8k_dir, out, "--max-steps", "3") + ["--resume"])
    saved = json.load(open(os.path.join(out, "args.json")))
    assert [(r["step"], r["changed"]) for r in saved.pop("resumes")] == [(2, {"max_steps": [2, 3], "output_dir": [two_steps, out]})]
    assert saved == old and [r["step"] for r in metrics(out)] == [1, 2, 3]

    # A run with no args.json at all: one line says the flags cannot be checked, and it resumes.
    out = copy_run(two_steps, tmp_path / "none")
    os.remove(os.path.join(out, "args.json"))
    capsys.readouterr()
    train.main(base_argv(tiny_model_dir, gsm8k_dir, out, "--max-steps", "3") + ["--resume"])
    assert f"note: {out} has no args.json, so this resume cannot check that its flags are the run's" in capsys.readouterr().out
    assert [r["step"] for r in metrics(out)] == [1, 2, 3] and not os.path.exists(os.path.join(out, "args.json"))


def test_what_a_resume_compares_by_meaning(tmp_path):
    """The device by its kind (torchrun gives each rank its own cuda:N) and --parallel, which
    follows the process count, may change; a CPU run resumed on a GPU may not (--dtype auto
    would mean bf16 there)."""
    args = train.parse_args(["--output-dir", str(tmp_path), "--device", "cuda"])
    train.write_args(str(tmp_path), args, None, 0)
    args.resume, args.device, args.parallel = True, "cuda:1", "ddp"
    saved, changed = train.check_resume(args)
    assert changed == {"device": ["cuda", "cuda:1"], "parallel": [None, "ddp"]} and saved["world"] == 1
    args.device = "cpu"
    with pytest.raises(ValueError) as e:
        train.check_resume(args)
    assert str(e.value).splitlines()[1:] == ["--device: run has cuda, resume asks cpu"]


def test_a_run_killed_before_its_first_checkpoint_starts_afresh(tmp_path, tiny_model_dir, gsm8k_dir, monkeypatch):
    """A crash (not Ctrl-C: nothing is saved) in step 2 leaves step 1's row and no state.pt; the
    rerun starts at step 0 and its metrics.jsonl holds each step once, as an uninterrupted run's."""
    whole = metrics(run(tmp_path / "a", tiny_model_dir, gsm8k_dir, "--max-steps", "3"))
    real, calls = train.response_loss_sum, []

    def crash(*a):
        calls.append(1)
        if len(calls) == 3:                      # 2 micro-batches per step: the 1st of step 2
            raise RuntimeError("killed")
        return real(*a)

    monkeypatch.setattr(train, "response_loss_sum", crash)
    with pytest.raises(RuntimeError, match="killed"):
        run(tmp_path / "b", tiny_model_dir, gsm8k_dir, "--max-steps", "3")
    out = str(tmp_path / "b" / "run")
    assert [r["step"] for r in metrics(out)] == [1] and not os.path.exists(os.path.join(out, "state.pt"))
    monkeypatch.setattr(train, "response_loss_sum", real)
    rows = metrics(run(tmp_path / "b", tiny_model_dir, gsm8k_dir, "--max-steps", "3"))
    assert [r["step"] for r in rows] == [1, 2, 3]                      # not 1, 1, 2, 3
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in whole], rel=1e-5)


def test_nan_loss_is_refused_without_saving(tmp_path, tiny_model_dir, gsm8k_dir, monkeypatch):
    monkeypatch.setattr(train, "response_loss_sum", lambda *a: torch.tensor(float("nan"), requires_grad=True))
    with pytest.raises(SystemExit, match=r"error: loss is nan at step 1: not saved"):
        run(tmp_path, tiny_model_dir, gsm8k_dir, "--max-steps", "3")
    assert not os.path.exists(tmp_path / "run" / "adapter.safetensors")


@pytest.mark.parametrize("method,settings", [("lora", dict(rank=32, k=None)), ("dora", dict(rank=32, k=None)),
                                             ("hydralora", dict(rank=16, k=3)), ("moelora", dict(rank=8, k=4)),
                                             ("full", dict(rank=None, k=None))])
def test_other_methods_at_their_paper_settings(tmp_path, tiny_model_dir, gsm8k_dir, method, settings):
    """Every method trains with no setting given: the table's (the paper's) are used, alpha = 2r."""
    out = run(tmp_path, tiny_model_dir, gsm8k_dir, "--method", method, "--max-steps", "6",
              "--lr", "1e-3" if method == "full" else "5e-2")
    rows = metrics(out)
    assert rows[-1]["loss"] < rows[0]["loss"]
    saved = json.load(open(os.path.join(out, "args.json")))
    assert {key: saved[key] for key in settings} == settings
    if method == "full":
        assert os.path.exists(os.path.join(out, "model", "config.json")) and not os.path.exists(os.path.join(out, "model.tmp"))
        assert os.path.basename(out) == "run" and saved["alpha"] is None
    else:
        cfg = idlora.read_adapter_config(os.path.join(out, "adapter.safetensors"))
        assert cfg["method"] == method and cfg["r"] == settings["rank"] and cfg["alpha"] == 2 * settings["rank"]
        assert cfg.get("k") == settings["k"] and cfg["dropout"] == 0.05


def test_a_flag_the_method_does_not_use_is_an_error(capsys):
    for argv, flag in ((["--method", "lora", "--k", "4"], "--k"), (["--method", "dora", "--boost", "1"], "--boost"),
                       (["--method", "hydralora", "--selection", "serial"], "--selection"),
                       (["--method", "full", "--rank", "8"], "--rank"), (["--method", "full", "--dropout", "0.1"], "--dropout")):
        with pytest.raises(SystemExit):
            train.parse_args(argv)
        assert f"error: {flag} does not apply to --method {argv[1]}" in capsys.readouterr().err
    args = train.parse_args(["--method", "moelora", "--k", "2"])
    assert (args.rank, args.k, args.alpha, args.dropout, args.boost) == (8, 2, 16.0, 0.05, None)
    assert args.output_dir == os.path.join("runs", "gsm8k-moelora-r8")
    assert train.parse_args(["--method", "full"]).output_dir == os.path.join("runs", "gsm8k-full")


def test_bf16_on_a_tiny_model(tmp_path, tiny_model_dir, gsm8k_dir):
    out = run(tmp_path, tiny_model_dir, gsm8k_dir, "--dtype", "bf16", "--max-steps", "6")
    rows = metrics(out)
    assert rows[-1]["loss"] < rows[0]["loss"]
    saved = load_file(os.path.join(out, "adapter.safetensors"))
    assert {t.dtype for t in saved.values()} == {torch.float32, torch.int64}   # fp32 adapter, int64 indices


def test_a_4bit_base_trains_and_its_adapter_says_so(tmp_path, tiny_model_dir, gsm8k_dir, capsys):
    out = run(tmp_path, tiny_model_dir, gsm8k_dir, "--quantize", "nf4", "--max-steps", "6")
    assert "quantize nf4: 14 layers (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj) in 4 bits" \
        in capsys.readouterr().out
    rows = metrics(out)
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert idlora.read_adapter_config(os.path.join(out, "adapter.safetensors"))["quantize"] == "nf4"
    model, _ = train.load_trained(out)                                  # quantized again, as it was trained
    assert {type(model.get_submodule(n).base).__name__ for n in model.adapter_config["ranks"]} == {"NF4Linear"}
    assert "--quantize: run has nf4, resume asks unset" in str(pytest.raises(
        SystemExit, run, tmp_path, tiny_model_dir, gsm8k_dir, "--max-steps", "6", "--resume").value)


@pytest.mark.parametrize("argv, msg", [
    (["--method", "full", "--quantize", "nf4"], "--quantize nf4 stores a frozen base in 4 bits, and --method full "
                                                "trains every weight: use an adapter method, or drop --quantize"),
    (["--parallel", "fsdp", "--quantize", "nf4", "--micro-batch-size", "2"],
     "--quantize nf4 does not run under --parallel fsdp: FSDP2 shards parameters, and the 4-bit weights are buffers "
     "every rank would hold whole; use --parallel ddp")])
def test_what_a_4bit_base_refuses(argv, msg, capsys, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(train, "WORLD", 2)
    with pytest.raises(SystemExit):
        train.parse_args(argv)
    assert msg in capsys.readouterr().err


def test_a_random_model_built_one_4bit_layer_at_a_time():
    """--model-config with --quantize: made from the meta device layer by layer; the same model as one built
    whole and then quantized (Hugging Face's init, the rotary frequencies recomputed), nothing left on meta."""
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = train.random_model(config, torch.float32, "cpu", "nf4")
    assert not any(t.is_meta for t in (*model.parameters(), *model.buffers()))
    assert sum(type(m).__name__ == "NF4Linear" for m in model.modules()) == 14
    assert model.lm_head.weight is model.model.embed_tokens.weight
    whole = train.random_model(config, torch.float32, "cpu")
    assert torch.equal(model.model.rotary_emb.inv_freq, whole.model.rotary_emb.inv_freq)
    assert torch.equal(model.model.norm.weight, torch.ones(64))
    w = model.model.layers[1].mlp.up_proj.dequantize()
    assert 0.015 < w.std() < 0.025                                     # initializer_range 0.02, not empty memory
    ids = torch.randint(0, 128, (1, 8))
    assert torch.isfinite(model(ids).logits).all()


def test_llama3_8b_from_config_on_meta():
    """The 8B architecture for GPU memory checks, built in bf16 (here on `meta`: no memory)."""
    model, tok = train.model_from_config("llama-3-8b", torch.bfloat16, "meta")
    assert model.dtype == torch.bfloat16 and sum(p.numel() for p in model.parameters()) == 8_030_261_248
    assert max(tok.get_vocab().values()) < model.config.vocab_size       # the tokenizer's ids fit
    with pytest.raises(ValueError, match="unknown --model-config"):
        train.model_from_config("llama-70b", torch.bfloat16, "meta")


def test_clear_errors(tmp_path, tiny_model_dir, gsm8k_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit, match=r"error: .*codealpaca"):
        run(tmp_path, tiny_model_dir, str(empty), "--task", "code")
    with pytest.raises(SystemExit, match=r"error: target module\(s\) \['qproj'\] match no linear layer"):
        run(tmp_path, tiny_model_dir, gsm8k_dir, "--targets", "qproj")
    with pytest.raises(SystemExit, match=r"error: --resume: no checkpoint"):
        run(tmp_path / "new", tiny_model_dir, gsm8k_dir, "--resume")
    with pytest.raises(SystemExit):
        train.parse_args(["--task", "math"])
    # a rank no layer can hold is one line, not an allocation of gigabytes (the tiny model's layers are 64 wide)
    with pytest.raises(SystemExit, match=r"error: rank 100000 does not fit model.layers.0.self_attn.q_proj of shape "
                                         r"\(64, 64\): it needs 1 <= r <= 64"):
        run(tmp_path / "big", tiny_model_dir, gsm8k_dir, "--method", "dora", "--rank", "100000")


def test_bad_data_is_one_line(tmp_path, tiny_model_dir, gsm8k_dir):
    """Each mistake in the data stops the run before it writes anything, with one line that names
    the file (and the line, for one that is not JSON) or the flag to change."""
    good = open(os.path.join(gsm8k_dir, "gsm8k", "train.jsonl")).read().splitlines(keepends=True)
    files = {"broken.jsonl": "".join(good[:5]) + '{"question": "What is\t1?", "answer": "#### 1"}\n' + "".join(good[5:]),
             "empty.jsonl": "", "blank.jsonl": "\n\n",
             "fields.jsonl": good[0] + '{"question": "What is 1 plus 1?", "solution": "#### 2"}\n',
             "dir/gsm8k/train.jsonl": "".join(good[:5]) + "{'question': 'single quotes'}\n",
             "nofield/gsm8k/train.jsonl": good[0] + '{"question": "q", "ans": "#### 1"}\n',
             "nothing/gsm8k/train.jsonl": ""}
    for name, text in files.items():
        os.makedirs(os.path.dirname(tmp_path / name), exist_ok=True)
        (tmp_path / name).write_text(text)
    os.makedirs(tmp_path / "folder")
    t = str(tmp_path)
    for flags, line in [
            (["--train-file", f"{t}/broken.jsonl"],
             f"error: {t}/broken.jsonl, line 6: not valid JSON (Invalid control character at column 22)"),
            (["--train-file", f"{t}/empty.jsonl"], f"error: --train-file {t}/empty.jsonl holds no records"),
            (["--train-file", f"{t}/blank.jsonl"], f"error: --train-file {t}/blank.jsonl holds no records"),
            (["--train-file", f"{t}/fields.jsonl"],
             f"error: {t}/fields.jsonl: record 2 has neither question/answer nor instruction/output"),
            (["--train-file", f"{t}/folder"],
             f"error: --train-file {t}/folder is a folder: it takes one JSONL file (a folder of data files is --data-dir)"),
            (["--train-file", f"{t}/nothing.jsonl"], f"error: no such file: {t}/nothing.jsonl"),
            (["--data-dir", f"{t}/dir"], f"error: {t}/dir/gsm8k/train.jsonl, line 6: not valid JSON "
                                         "(Expecting property name enclosed in double quotes at column 2)"),
            (["--data-dir", f"{t}/nofield"], f"error: data: {t}/nofield/gsm8k/train.jsonl: record 2 has no 'answer' "
                                             "field, which gsm8k needs (it has 'question', 'ans')"),
            (["--data-dir", f"{t}/nothing"], f"error: data: gsm8k/train from {t}/nothing/gsm8k/train.jsonl holds no records"),
            (["--max-examples", "4", "--max-len", "16"],       # the Alpaca prompt alone is longer than 16 tokens
             "error: all 4 examples were dropped: each prompt fills --max-len 16 tokens, leaving no response token "
             "to learn; raise --max-len")]:
        with pytest.raises(SystemExit) as e:
            run(tmp_path / "out", tiny_model_dir, gsm8k_dir, *flags)
        assert str(e.value) == line
        assert not os.path.exists(tmp_path / "out")                # nothing written


def test_a_broken_jsonl_line_from_the_command_line(tmp_path, tiny_model_dir):
    """The issue's case as a user meets it: exit status 1 and one line on stderr."""
    path = tmp_path / "train.jsonl"
    path.write_text('{"question": "q", "answer": "#### 1"}\n' * 5 + '{"question": "What is\t1?", "answer": "#### 1"}\n')
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = subprocess.run([sys.executable, "train.py", "--model", tiny_model_dir, "--train-file", str(path),
                        "--output-dir", str(tmp_path / "out")], cwd=root, capture_output=True, text=True, timeout=300)
    assert p.returncode == 1
    assert p.stderr == f"error: {path}, line 6: not valid JSON (Invalid control character at column 22)\n"


@pytest.mark.parametrize("argv, msg", [(["--rank", "0"], "--rank must be at least 1"),
                                       (["--method", "moelora", "--k", "0"], "--k must be at least 1"),
                                       (["--micro-batch-size", "0"], "--micro-batch-size must be at least 1"),
                                       (["--save-every", "0"], "--save-every must be at least 1"),
                                       (["--max-examples", "0"], "--max-examples must be at least 1"),
                                       (["--epochs", "-1"], "--epochs must be above 0, got -1.0"),
                                       (["--dropout", "1.5"], "--dropout must be in [0, 1), got 1.5")])
def test_bad_settings_are_one_line(argv, msg, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(argv)
    assert msg in capsys.readouterr().err


# -----------------------------------------------------------------------------
# The embedded model, end to end


def test_embedded_model_two_gsm8k_steps(tmp_path, embedded, row_cache):
    """Two steps of the README's main command (paper settings r=128, k=4) on the shipped GSM8K."""
    out = str(tmp_path / "run")
    train.main(["--task", "gsm8k", "--rank", "128", "--k", "4", "--max-steps", "2", "--batch-size", "2",
                "--micro-batch-size", "2", "--max-len", "128", "--output-dir", out, "--cluster-cache", row_cache])
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2] and all(0 < r["loss"] < 5 for r in rows)
    cfg = idlora.read_adapter_config(os.path.join(out, "adapter.safetensors"))
    assert cfg["base_model"] == "smollm2" and cfg["method"] == "idlora" and set(cfg["ranks"].values()) == {48, 128}


def test_embedded_model_on_a_4bit_base_two_steps_then_resumes(tmp_path, embedded):
    """--quantize nf4 on the embedded SmolLM2 (its 210 projections in 4 bits, fp32 compute as the studies),
    2 steps, then a resume to step 3. Random rows: PMRC's clustering of the dequantized rows is tested on
    tiny models (tests/test_nf4.py), and would cost minutes here."""
    out = str(tmp_path / "run")
    argv = ["--task", "gsm8k", "--rank", "128", "--k", "4", "--selection", "random", "--batch-size", "2",
            "--micro-batch-size", "2", "--max-len", "128", "--dtype", "fp32", "--quantize", "nf4", "--output-dir", out,
            "--save-every", "1"]
    train.main(argv + ["--max-steps", "2"])
    train.main(argv + ["--max-steps", "3", "--resume"])
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3] and all(0 < r["loss"] < 5 for r in rows)
    cfg = idlora.read_adapter_config(os.path.join(out, "adapter.safetensors"))
    assert cfg["quantize"] == "nf4" and len(cfg["ranks"]) == 210
