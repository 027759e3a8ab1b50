"""Tests of reproduce.py on a tiny random LLaMA and tiny data files: each study's grid runs, the
best learning rate gets the extra seeds, a second call runs nothing, the table is rebuilt, and
the multitask held-out sets never overlap its training mix.

    pytest tests/test_reproduce.py
"""

import argparse
import json
import os
import subprocess

import pytest

import train
from experiments import reproduce


def write_json_lines(path, records):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


@pytest.fixture
def tiny_data(tmp_path):
    """GSM8K train 16 / test 4, CodeAlpaca 12 and Saferpaca 12 (distinct texts), in --data-dir layout."""
    root = tmp_path / "data"
    for split, n in (("train", 16), ("test", 4)):
        write_json_lines(str(root / "gsm8k" / f"{split}.jsonl"),
                         [{"question": f"What is {i} plus {i} ({split})?", "answer": f"{i}+{i}={2 * i}\n#### {2 * i}"}
                          for i in range(n)])
    os.makedirs(root / "codealpaca")
    json.dump([{"instruction": f"Write code {i}", "input": "", "output": f"print({i})"} for i in range(12)],
              open(root / "codealpaca" / "code_alpaca_2k.json", "w"))
    os.makedirs(root / "saferpaca")
    json.dump([{"instruction": f"Harmful request {i}", "input": "", "output": f"I cannot help with {i}."}
               for i in range(12)], open(root / "saferpaca" / "safety_only_data_Instructions.json", "w"))
    return str(root)


def common(tmp_path, tiny_model_dir, data_dir):
    return ["--lrs", "1e-2,5e-2", "--seeds", "1", "--model", tiny_model_dir, "--data-dir", data_dir,
            "--batch-size", "4", "--micro-batch-size", "2", "--max-len", "48",
            "--runs", str(tmp_path / "runs"), "--results", str(tmp_path / "results")]


def results(tmp_path, study):
    folder = tmp_path / "results" / study
    return {f[:-5]: json.load(open(folder / f)) for f in os.listdir(folder) if f.endswith(".json")}


def test_gsm8k_grid_resumes_and_tabulates(tmp_path, tiny_model_dir, tiny_data, monkeypatch):
    argv = common(tmp_path, tiny_model_dir, tiny_data) + [
        "--study", "gsm8k", "--methods", "idlora-r128-k4,lora-r8", "--train-examples", "8", "--val-examples", "4",
        "--test-examples", "3", "--accuracy-examples", "2", "--max-new-tokens", "8", "--lr-extensions", "0"]
    reproduce.main(argv)
    rows = results(tmp_path, "gsm8k")
    # the base model, the lr grid for both methods, then seed 1 for the main-comparison method at its best lr
    best = min((rows[f"idlora-r128-k4_lr{lr}_s0"] for lr in ("0.01", "0.05")), key=lambda r: r["val_loss"])["lr"]
    assert set(rows) == {"base", "idlora-r128-k4_lr0.01_s0", "idlora-r128-k4_lr0.05_s0", "lora-r8_lr0.01_s0",
                         "lora-r8_lr0.05_s0", f"idlora-r128-k4_lr{best:g}_s1"}
    r = rows["lora-r8_lr0.05_s0"]
    assert r["steps"] == 2 and r["trainable"] > 0 and r["test_examples"] == {"gsm8k": 3}
    assert 0 <= r["accuracy"]["gsm8k"] <= 1 and r["accuracy_examples"] == 2
    assert rows["base"]["trainable"] == 0 and rows["base"]["steps"] == 0
    assert r["test_loss"] != rows["base"]["test_loss"]                   # training moved the loss
    files = os.listdir(tmp_path / "results" / "gsm8k")
    assert "table.md" in files and "loss_vs_params.png" in files
    table = open(tmp_path / "results" / "gsm8k" / "table.md").read()
    assert f"| idlora-r128-k4 | 0.01, 0.05 | {best:g} | 2 | " in table                 # best lr, 2 seeds

    def no_training(*a, **kw):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(reproduce.train, "main", no_training)
    reproduce.main(argv)                                                 # everything done: nothing runs


def test_lr_search_grows_the_grid_past_an_edge_until_the_best_is_inside(tmp_path):
    """The lr search rule on recorded validation losses: a best lr at the grid's lower edge adds
    6e-5 below 2e-4, a best at the upper edge adds 6e-3 above 2e-3, at most --lr-extensions steps
    per edge; the extra seeds wait until the search is complete, then run seed by seed, for the
    --seed-methods only."""
    args = argparse.Namespace(study="gsm8k", results=str(tmp_path), lrs=[2e-4, 6e-4, 2e-3], lr_extensions=2, lrs_around=None,
                              lrs_from=None, methods=["idlora-r128-k4", "lora-r16"], seeds=[1, 2], seed_methods=list(reproduce.MAIN))
    os.makedirs(tmp_path / "gsm8k")

    def record(method, lr, val_loss):
        json.dump({"val_loss": val_loss, "lr": lr}, open(reproduce.result_path(args, reproduce.run_name(method, lr, 0)), "w"))

    todo = lambda: [name for name, *_ in reproduce.plan(args) if not reproduce.done(args, name)]
    for lr, val in ((2e-4, 0.80), (6e-4, 0.81), (2e-3, 0.95)):          # ID-LoRA: best at the lower edge
        record("idlora-r128-k4", lr, val)
    for lr, val in ((2e-4, 1.04), (6e-4, 0.88), (2e-3, 0.85)):          # LoRA: best at the upper edge
        record("lora-r16", lr, val)
    assert reproduce.lr_search(args, "idlora-r128-k4") == ([6e-5, 2e-4, 6e-4, 2e-3], None)
    assert reproduce.lr_search(args, "lora-r16") == ([2e-4, 6e-4, 2e-3, 6e-3], None)
    assert todo() == ["base", "idlora-r128-k4_lr6e-05_s0", "lora-r16_lr0.006_s0"]    # no seeds yet
    record("idlora-r128-k4", 6e-5, 0.79)                                 # still the edge: one more step
    record("lora-r16", 6e-3, 0.90)                                       # worse: 2e-3 is inside now
    assert reproduce.lr_search(args, "idlora-r128-k4") == ([2e-5, 6e-5, 2e-4, 6e-4, 2e-3], None)
    assert reproduce.lr_search(args, "lora-r16") == ([2e-4, 6e-4, 2e-3, 6e-3], 2e-3)
    assert todo() == ["base", "idlora-r128-k4_lr2e-05_s0", "lora-r16_lr0.002_s1", "lora-r16_lr0.002_s2"]
    record("idlora-r128-k4", 2e-5, 0.78)                                 # edge again, but 2 steps is the limit
    assert reproduce.lr_search(args, "idlora-r128-k4") == ([2e-5, 6e-5, 2e-4, 6e-4, 2e-3], 2e-5)
    assert todo() == ["base", "idlora-r128-k4_lr2e-05_s1", "lora-r16_lr0.002_s1",          # seed by seed
                      "idlora-r128-k4_lr2e-05_s2", "lora-r16_lr0.002_s2"]
    args.seed_methods = ["lora-r16"]                                     # --seed-methods lora-r16
    assert todo() == ["base", "lora-r16_lr0.002_s1", "lora-r16_lr0.002_s2"]
    args.lr_extensions = 0                                               # no extension: the grid as given
    assert reproduce.lr_search(args, "lora-r16") == ([2e-4, 6e-4, 2e-3], 2e-3)


def test_lrs_around_starts_each_method_where_the_earlier_study_chose(tmp_path):
    """--lrs-around DIR: each method's grid starts at the lr it chose in DIR (its search replayed from
    --lrs) and the half-decade on each side; the usual rule then grows it from there."""
    earlier = argparse.Namespace(study="gsm8k", results=str(tmp_path / "short"), lrs=[2e-4, 6e-4, 2e-3],
                                 lr_extensions=2, lrs_around=None, lrs_from=None)
    os.makedirs(tmp_path / "short" / "gsm8k")
    for method, vals in (("idlora-r128-k4", (0.80, 0.81, 0.95)), ("lora-r16", (1.04, 0.83, 0.85))):
        for lr, val in zip(earlier.lrs, vals):
            json.dump({"val_loss": val, "lr": lr}, open(reproduce.result_path(earlier, reproduce.run_name(method, lr, 0)), "w"))
    json.dump({"val_loss": 0.85, "lr": 6e-5}, open(reproduce.result_path(earlier, "idlora-r128-k4_lr6e-05_s0"), "w"))
    args = argparse.Namespace(**{**vars(earlier), "results": str(tmp_path / "long"), "lrs_around": str(tmp_path / "short"),
                                 "methods": ["idlora-r128-k4", "lora-r16"], "seeds": [1], "seed_methods": list(reproduce.MAIN)})
    # ID-LoRA chose 2e-4 (after its grid grew to 6e-5, which was worse), LoRA 6e-4
    assert reproduce.start_grid(args, "idlora-r128-k4") == [6e-5, 2e-4, 6e-4]
    assert reproduce.start_grid(args, "lora-r16") == [2e-4, 6e-4, 2e-3]
    assert [name for name, *_ in reproduce.plan(args)] == [                 # the earlier choice first
        "base", "idlora-r128-k4_lr0.0002_s0", "lora-r16_lr0.0006_s0", "idlora-r128-k4_lr6e-05_s0",
        "lora-r16_lr0.0002_s0", "idlora-r128-k4_lr0.0006_s0", "lora-r16_lr0.002_s0"]
    args.methods = ["lora-r8"]                                           # nothing searched for it in DIR
    with pytest.raises(SystemExit, match="lora-r8 has no complete learning-rate search"):
        reproduce.plan(args)
    # --lrs-from DIR: that lr alone, no search; then the seeds
    args = argparse.Namespace(**{**vars(args), "lrs_around": None, "lrs_from": str(tmp_path / "short"),
                                 "methods": ["idlora-r128-k4", "lora-r16"], "seeds": [1, 2]})
    assert [name for name, *_ in reproduce.plan(args)] == [
        "base", "idlora-r128-k4_lr0.0002_s0", "lora-r16_lr0.0006_s0"]
    for name in ("idlora-r128-k4_lr0.0002_s0", "lora-r16_lr0.0006_s0"):
        os.makedirs(tmp_path / "long" / "gsm8k", exist_ok=True)
        json.dump({"val_loss": 1.0, "lr": 0}, open(reproduce.result_path(args, name), "w"))
    assert [name for name, *_ in reproduce.plan(args)][3:] == [
        "idlora-r128-k4_lr0.0002_s1", "lora-r16_lr0.0006_s1", "idlora-r128-k4_lr0.0002_s2", "lora-r16_lr0.0006_s2"]


def test_a_study_on_a_4bit_base(tmp_path, tiny_model_dir, tiny_data, capsys):
    """--quantize nf4 reaches train.py and eval.py, the base row is the 4-bit base, every result file
    records it; the folders must say nf4, and full fine-tuning is refused."""
    argv = common(tmp_path, tiny_model_dir, tiny_data) + [
        "--study", "gsm8k", "--methods", "lora-r8", "--lrs", "5e-2", "--seeds", "", "--train-examples", "8",
        "--val-examples", "4", "--test-examples", "3", "--accuracy-examples", "2", "--max-new-tokens", "8"]
    for flag in ("--results", "--runs"):
        with pytest.raises(SystemExit):
            reproduce.main(argv + ["--quantize", "nf4"])
        assert f"--quantize nf4: {flag} " in capsys.readouterr().err
        argv[argv.index(flag) + 1] += "-nf4"
    with pytest.raises(SystemExit):
        reproduce.main(argv + ["--quantize", "nf4", "--methods", "lora-r8,full"])
    assert "full fine-tuning has no frozen base to quantize" in capsys.readouterr().err
    reproduce.main(argv + ["--quantize", "nf4"])
    rows = {f[:-5]: json.load(open(tmp_path / "results-nf4" / "gsm8k" / f))
            for f in os.listdir(tmp_path / "results-nf4" / "gsm8k") if f.endswith(".json")}
    assert set(rows) == {"base", "lora-r8_lr0.05_s0"} and {r["quantize"] for r in rows.values()} == {"nf4"}
    out = tmp_path / "runs-nf4" / "gsm8k" / "lora-r8_lr0.05_s0"
    assert json.load(open(out / "args.json"))["quantize"] == "nf4"
    assert json.load(open(out / "eval" / "gsm8k-limit2.json"))["settings"]["quantize"] == "nf4"
    printed = capsys.readouterr().out
    assert "quantize nf4: 14 layers" in printed and "is loaded on a" not in printed     # no precision warning


def test_learning_curve_from_one_run(tmp_path, tiny_model_dir, tiny_data):
    """--eval-at: held-out losses at intermediate steps of ONE run (train.py --save-at keeps the
    adapter of those steps), stored in the result, the final point equal to the run's own losses."""
    argv = common(tmp_path, tiny_model_dir, tiny_data) + [
        "--study", "gsm8k", "--methods", "lora-r8", "--lrs", "5e-2", "--seeds", "", "--train-examples", "12",
        "--val-examples", "4", "--test-examples", "3", "--accuracy-examples", "1", "--max-new-tokens", "4",
        "--eval-at", "1,2,7"]
    reproduce.main(argv)
    r = results(tmp_path, "gsm8k")["lora-r8_lr0.05_s0"]
    assert r["steps"] == 3 and [p["step"] for p in r["curve"]] == [1, 2, 3]      # 7 is past the end
    assert r["curve"][-1] == dict(step=3, val_loss=r["val_loss"], test_loss=r["test_loss"])
    assert len({p["test_loss"] for p in r["curve"]}) == 3                        # three different adapters
    run = tmp_path / "runs" / "gsm8k" / "lora-r8_lr0.05_s0"
    assert sorted(f for f in os.listdir(run) if f.startswith("adapter-step")) == \
        ["adapter-step1.safetensors", "adapter-step2.safetensors"]
    table = open(tmp_path / "results" / "gsm8k" / "table.md").read()
    means = " | ".join(f"{p['test_loss']:.4f} ({p['test_loss']:.4f} to {p['test_loss']:.4f})" for p in r["curve"])
    assert f"| lora-r8 | 1 | {means} |" in table
    assert os.path.exists(tmp_path / "results" / "gsm8k" / "learning_curves.png")


def test_a_run_scored_after_a_restart_keeps_its_training_time(tmp_path, tiny_model_dir, tiny_data, monkeypatch):
    """A worker stopped while it scored a trained run: the next one only scores it, and the result
    still records the whole training time (summed from train.py's log), not this process's 0 s."""
    argv = common(tmp_path, tiny_model_dir, tiny_data) + [
        "--study", "gsm8k", "--methods", "lora-r8", "--lrs", "5e-2", "--seeds", "", "--train-examples", "8",
        "--val-examples", "4", "--test-examples", "3", "--accuracy-examples", "1", "--max-new-tokens", "4"]
    reproduce.main(argv)
    path = tmp_path / "results" / "gsm8k" / "lora-r8_lr0.05_s0.json"
    first = json.load(open(path))
    log = [json.loads(l) for l in open(tmp_path / "runs" / "gsm8k" / "lora-r8_lr0.05_s0" / "metrics.jsonl")]
    assert [r["step"] for r in log] == [1, 2] and all(r["seconds"] > 0 for r in log)
    assert first["train_seconds"] == round(sum(r["seconds"] for r in log), 1) > 0
    os.remove(path)                                                   # the result was never written

    def no_training(*a, **kw):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(reproduce.train, "main", no_training)
    reproduce.main(argv)
    again = json.load(open(path))
    assert again["train_seconds"] == first["train_seconds"] and again["test_loss"] == first["test_loss"]


def test_claims_share_a_grid_between_processes(tmp_path, tiny_data, monkeypatch):
    """A run claimed by a live process is left to it; a dead process's claim is taken over; a
    worker with nothing left to take waits for the others' results, then finishes; no claim stays."""
    argv = ["--study", "gsm8k", "--methods", "lora-r8", "--lrs", "1e-2,5e-2", "--seeds", "", "--lr-extensions", "0",
            "--data-dir", tiny_data, "--train-examples", "8", "--val-examples", "4", "--test-examples", "3",
            "--runs", str(tmp_path / "runs"), "--results", str(tmp_path / "results")]
    args = argparse.Namespace(study="gsm8k", runs=str(tmp_path / "runs"), results=str(tmp_path / "results"))
    live = subprocess.Popen(["sleep", "60"])
    dead = subprocess.Popen(["true"])
    dead.wait()
    os.makedirs(tmp_path / "runs" / "gsm8k")
    for name, proc in (("lora-r8_lr0.01_s0", live), ("lora-r8_lr0.05_s0", dead)):
        open(reproduce.claim_path(args, name), "w").write(str(proc.pid))
    assert not reproduce.claim(args, "lora-r8_lr0.01_s0")               # the live one keeps it
    ran = []

    def record(name, lr):
        os.makedirs(os.path.join(args.results, "gsm8k"), exist_ok=True)
        json.dump({"val_loss": 1.0, "lr": lr}, open(reproduce.result_path(args, name), "w"))

    def fake_run(args, name, method, lr, seed, *splits):
        assert open(reproduce.claim_path(args, name)).read() == str(os.getpid())
        ran.append(name)
        record(name, lr)

    def other_worker_finishes(seconds):                                  # called while we wait
        assert live.poll() is None, "waited again: a dead process's claim was not taken over"
        record("lora-r8_lr0.01_s0", 1e-2)
        os.remove(reproduce.claim_path(args, "lora-r8_lr0.01_s0"))
        live.kill()

    monkeypatch.setattr(reproduce, "one_run", fake_run)
    monkeypatch.setattr(reproduce, "table", lambda args: None)
    monkeypatch.setattr(reproduce.time, "sleep", other_worker_finishes)
    reproduce.main(argv)
    assert ran == ["base", "lora-r8_lr0.05_s0"]                          # 1e-2 was the other worker's
    assert reproduce.done(args, "lora-r8_lr0.01_s0")
    assert not [f for f in os.listdir(tmp_path / "runs" / "gsm8k") if f.endswith(".claim")]


def test_multitask_mix_is_disjoint_from_its_held_out_sets(tmp_path, tiny_model_dir, tiny_data):
    argv = common(tmp_path, tiny_model_dir, tiny_data) + [
        "--study", "multitask", "--methods", "lora-r8", "--lrs", "1e-2", "--train-examples", "4",
        "--val-examples", "3", "--test-examples", "3", "--mmlu-per-subject", "1", "--csqa-examples", "4"]
    reproduce.main(argv)
    mix = [json.loads(l) for l in open(tmp_path / "runs" / "multitask" / "lora-r8_lr0.01_s0" / "train.jsonl")]
    assert len(mix) == 12                                                # 4 of each task
    args = argparse.Namespace(
        study="multitask", train_examples=4, val_examples=3, test_examples=3, data_dir=tiny_data)
    train_set, val, test = reproduce.splits(args)
    assert train_set == mix
    key = lambda r: r.get("question") or r["instruction"]
    trained = {key(r) for r in mix}
    for task in ("gsm8k", "code", "safety"):
        assert len(val[task]) == 3 and len(test[task]) == 3
        assert not trained & {key(r) for r in val[task] + test[task]}
        assert not {key(r) for r in val[task]} & {key(r) for r in test[task]}
    r = results(tmp_path, "multitask")["lora-r8_lr0.01_s0"]
    assert set(r["test_loss_per_task"]) == {"gsm8k", "code", "safety"}
    assert r["test_loss"] == pytest.approx(sum(r["test_loss_per_task"].values()) / 3)
    assert set(r["accuracy"]) == {"mmlu", "csqa"} and r["steps"] == 3   # 12 examples / batch 4
    assert "| base | 0 |" in open(tmp_path / "results" / "multitask" / "table.md").read()


def test_multitask_baselines_and_full_fine_tuning(tmp_path, tiny_model_dir, tiny_data):
    """A baseline adapter and full fine-tuning through the multitask study on the tiny model: each
    trains, is scored from its adapter or its model folder, and full fine-tuning searches a grid one
    decade below --lrs. A finished run keeps its adapter or model/, not its optimizer state."""
    argv = common(tmp_path, tiny_model_dir, tiny_data) + [
        "--study", "multitask", "--methods", "hydralora-r16-k3,full", "--lrs", "1e-2",
        "--seeds", "", "--train-examples", "4", "--val-examples", "2", "--test-examples", "2",
        "--mmlu-per-subject", "1", "--csqa-examples", "2"]
    reproduce.main(argv)
    rows = results(tmp_path, "multitask")
    assert set(rows) == {"base", "hydralora-r16-k3_lr0.01_s0", "full_lr0.001_s0"}
    base = rows["base"]
    for name, r in rows.items():
        if name != "base":
            assert r["steps"] == 3 and set(r["accuracy"]) == {"mmlu", "csqa"} and r["test_loss"] != base["test_loss"]
            assert not os.path.exists(tmp_path / "runs" / "multitask" / name / "state.pt")
    # the tiny model: 2 layers of 64 (q, o 64x64; k, v 32x64; gate, up 128x64; down 64x128), vocabulary of 49,152 tied
    shapes = [(64, 64), (32, 64), (32, 64), (64, 64), (128, 64), (128, 64), (64, 128)]
    assert rows["hydralora-r16-k3_lr0.01_s0"]["trainable"] == 2 * sum(16 * i + 3 * 16 * o + 3 * i for o, i in shapes)
    full = tmp_path / "runs" / "multitask" / "full_lr0.001_s0"
    assert rows["full_lr0.001_s0"]["trainable"] == sum(p.numel() for p in train.load_model(str(full / "model"))[0].parameters())
    assert json.load(open(full / "eval" / "csqa-limit2.json"))["model"] == str(full / "model")
    table = open(tmp_path / "results" / "multitask" / "table.md").read()
    assert "| full | 0.001 | 0.001 | 1 | " in table and "| hydralora-r16-k3 | 0.01 | 0.01 | 1 | " in table


def test_method_names_become_train_flags():
    assert reproduce.method_argv("idlora-r31-k4-noRB") == ["--method", "idlora", "--rank", "31", "--k", "4", "--boost", "1"]
    assert reproduce.method_argv("idlora-r128-k4-serial") == ["--method", "idlora", "--rank", "128", "--k", "4",
                                                              "--selection", "serial"]
    assert reproduce.method_argv("hydralora-r16-k3") == ["--method", "hydralora", "--rank", "16", "--k", "3"]
    assert reproduce.method_argv("full") == ["--method", "full"]
    for name in reproduce.METHODS:                                     # every one is a valid train.py run
        train.parse_args(reproduce.method_argv(name))
    with pytest.raises(ValueError, match="'vera-r8' is not"):
        reproduce.method_argv("vera-r8")
    args = argparse.Namespace(lrs=[2e-4, 6e-4, 2e-3], lrs_around=None, lrs_from=None)
    assert reproduce.start_grid(args, "full") == [2e-5, 6e-5, 2e-4] and reproduce.start_grid(args, "dora-r32") == args.lrs


def test_too_little_data_is_a_clear_error(tmp_path, tiny_model_dir, tiny_data):
    argv = common(tmp_path, tiny_model_dir, tiny_data) + [
        "--study", "multitask", "--train-examples", "10", "--val-examples", "3", "--test-examples", "3"]
    with pytest.raises(SystemExit, match="codealpaca has 12 examples"):
        reproduce.main(argv)


def test_unknown_method_is_a_one_line_error(tmp_path, capsys):
    for flag in ("--methods", "--seed-methods"):
        with pytest.raises(SystemExit):
            reproduce.main(["--study", "gsm8k", flag, "lora-r16,lora-r17", "--plan", "--results", str(tmp_path)])
        assert "unknown method(s) ['lora-r17']" in capsys.readouterr().err


def test_table_and_plot_from_a_partial_grid(tmp_path):
    """Mid-grid (no method has every lr yet) the table lists the runs and the plot is drawn."""
    folder = tmp_path / "results" / "gsm8k"
    folder.mkdir(parents=True)
    for run, method, lr, n, loss in (("base", "base", 0.0, 0, 1.4), ("lora-r16_lr0.0002_s0", "lora-r16", 2e-4, 10, 1.1)):
        json.dump(dict(run=run, method=method, lr=lr, trainable=n, val_loss=loss, test_loss=loss,
                       test_loss_per_task={"gsm8k": loss}, accuracy={"gsm8k": 0.0}), open(folder / f"{run}.json", "w"))
    reproduce.main(["--study", "gsm8k", "--table", "--results", str(tmp_path / "results")])
    table = open(folder / "table.md").read()
    assert "| lora-r16_lr0.0002_s0 | 10 | 1.1000 | 1.1000 | 0.000 |" in table
    assert os.path.getsize(folder / "loss_vs_params.png") > 0


def test_plot_ranks_the_ablations_on_the_right_only(tmp_path, monkeypatch):
    """loss_vs_params.png: the right panel ranks every method at its best lr, ablations included (best at
    the top); the left panel's bold best-lr points are the non-ablations only (an ablation sits at the
    count of the ID-LoRA it varies)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    folder = tmp_path / "results" / "gsm8k"
    folder.mkdir(parents=True)
    for method, n, loss in (("idlora-r16-k4", 10, 0.95), ("idlora-r16-k4-random", 10, 0.97), ("lora-r4", 10, 0.90)):
        json.dump(dict(run=f"{method}_lr0.001_s0", method=method, lr=1e-3, seed=0, trainable=n, val_loss=loss,
                       test_loss=loss, test_loss_per_task={"gsm8k": loss}, accuracy={"gsm8k": 0.0}),
                  open(folder / f"{method}_lr0.001_s0.json", "w"))
    figures = []
    monkeypatch.setattr(plt, "savefig", lambda *a, **k: figures.append(plt.gcf()))
    monkeypatch.setattr(plt, "close", lambda *a: None)
    reproduce.main(["--study", "gsm8k", "--table", "--lrs", "1e-3", "--results", str(tmp_path / "results")])
    left, right = figures[-1].axes
    ranked = [t.get_text().split()[0] for t in right.get_yticklabels()]
    assert ranked == ["idlora-r16-k4-random", "idlora-r16-k4", "lora-r4"]
    bold = [c for c in left.collections if c.get_label().endswith("best lr, mean over seeds")]
    assert sorted(p[1] for c in bold for p in c.get_offsets().tolist()) == [0.90, 0.95]


def test_table_gives_each_method_minus_idlora_with_welch_t(tmp_path):
    """The gap to ID-LoRA r=128 k=4 at each method's best lr, and Welch's t, in the method table and
    at each step of the learning curves, equal to a hand computation."""
    folder = tmp_path / "results" / "gsm8k"
    folder.mkdir(parents=True)
    losses = {"idlora-r128-k4": [0.90, 0.91, 0.95], "lora-r16": [0.85, 0.86, 0.87]}
    for method, seeds in losses.items():
        for s, loss in enumerate(seeds):
            curve = [dict(step=2, val_loss=loss + 0.1, test_loss=loss + 0.1), dict(step=4, val_loss=loss, test_loss=loss)]
            json.dump(dict(run=f"{method}_lr0.001_s{s}", method=method, lr=1e-3, seed=s, trainable=10, val_loss=loss,
                           test_loss=loss, test_loss_per_task={"gsm8k": loss}, accuracy={"gsm8k": 0.0}, curve=curve),
                      open(folder / f"{method}_lr0.001_s{s}.json", "w"))
    reproduce.main(["--study", "gsm8k", "--table", "--lrs", "1e-3", "--results", str(tmp_path / "results")])
    table = open(folder / "table.md").read()
    # mean 0.86 - 0.92 = -0.06; sample variances 0.0001 and 0.0007: se = sqrt(0.0008 / 3) = 0.01633, t = -3.67
    assert "| 0.8600 ± 0.0100 | -0.0600 (-3.7) |" in table
    assert "| lora-r16 minus idlora-r128-k4 (Welch t) | | -0.0600 (-3.7) | -0.0600 (-3.7) |" in table


def test_table_compares_with_idlora_r16_where_it_has_results(tmp_path):
    """With ID-LoRA r=16 k=4 in the results (the ablations at the 8B's fraction of rows), the method table
    gains a column of each method minus it, with Welch's t; ID-LoRA r=128's column stays."""
    folder = tmp_path / "results" / "gsm8k"
    folder.mkdir(parents=True)
    losses = {"idlora-r128-k4": [0.90, 0.91, 0.95], "idlora-r16-k4": [0.95, 0.96, 0.97], "lora-r4": [0.90, 0.91, 0.92]}
    for method, seeds in losses.items():
        for s, loss in enumerate(seeds):
            json.dump(dict(run=f"{method}_lr0.001_s{s}", method=method, lr=1e-3, seed=s, trainable=10, val_loss=loss,
                           test_loss=loss, test_loss_per_task={"gsm8k": loss}, accuracy={"gsm8k": 0.0}),
                      open(folder / f"{method}_lr0.001_s{s}.json", "w"))
    reproduce.main(["--study", "gsm8k", "--table", "--lrs", "1e-3", "--results", str(tmp_path / "results")])
    table = open(folder / "table.md").read()
    assert "| test loss (mean ± sd) | minus idlora-r128-k4 (Welch t) | minus idlora-r16-k4 (Welch t) |" in table
    # against r=16: 0.91 - 0.96 = -0.05, both variances 0.0001: se = sqrt(2 * 0.0001 / 3) = 0.008165, t = -6.1;
    # against r=128 (variance 0.0007): se = sqrt(0.0008 / 3) = 0.01633: -0.01 is t = -0.6, +0.04 is t = +2.4
    assert "| lora-r4 | 0.001 | 0.001 | 3 | 10 | 0.9100 ± 0.0100 | -0.0100 (-0.6) | -0.0500 (-6.1) |" in table
    assert "| idlora-r16-k4 | 0.001 | 0.001 | 3 | 10 | 0.9600 ± 0.0100 | +0.0400 (+2.4) |  |" in table


def test_table_of_a_lrs_from_study_gives_each_method_minus_itself_there(tmp_path):
    """A study at the lrs chosen in DIR (--lrs-from, e.g. on a 4-bit base) gains a column of each method
    minus the same method's seeds in DIR at that lr, with Welch's t; runs at DIR's other lrs are ignored."""
    for folder, losses in (("short", {"lora-r16": [0.85, 0.86, 0.87]}), ("nf4", {"lora-r16": [0.88, 0.90, 0.92]})):
        (tmp_path / folder / "gsm8k").mkdir(parents=True)
        for s, loss in enumerate(losses["lora-r16"]):
            json.dump(dict(run=f"lora-r16_lr0.001_s{s}", method="lora-r16", lr=1e-3, seed=s, trainable=10, val_loss=loss,
                           test_loss=loss, test_loss_per_task={"gsm8k": loss}, accuracy={"gsm8k": 0.0}),
                      open(tmp_path / folder / "gsm8k" / f"lora-r16_lr0.001_s{s}.json", "w"))
    for lr, val in ((1e-2, 0.99), (1e-4, 0.98)):           # the grid around 1e-3 in DIR, worse: 1e-3 is chosen there
        json.dump(dict(run=f"lora-r16_lr{lr:g}_s0", method="lora-r16", lr=lr, seed=0, trainable=10, val_loss=val,
                       test_loss=0.5, test_loss_per_task={"gsm8k": 0.5}, accuracy={"gsm8k": 0.0}),
                  open(tmp_path / "short" / "gsm8k" / f"lora-r16_lr{lr:g}_s0.json", "w"))
    reproduce.main(["--study", "gsm8k", "--table", "--lrs", "1e-4,1e-3,1e-2", "--lrs-from", str(tmp_path / "short"),
                    "--results", str(tmp_path / "nf4")])
    table = open(tmp_path / "nf4" / "gsm8k" / "table.md").read()
    # 0.90 - 0.86 = 0.04; variances 0.0004 and 0.0001: se = sqrt(0.0005 / 3) = 0.01291, t = 3.1
    assert f"| minus the same in {tmp_path / 'short'} (Welch t) |" in table
    assert "| lora-r16 | 0.001 | 0.001 | 3 | 10 | 0.9000 ± 0.0200 |  | +0.0400 (+3.1) |" in table   # no ID-LoRA here
