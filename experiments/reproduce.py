"""
Reproduce the paper's central claim at small scale: ID-LoRA against LoRA and the other baselines
(DoRA, HydraLoRA, MoELoRA, full fine-tuning) on the embedded SmolLM2-135M-Instruct, with the same
data, steps, seeds and learning-rate rule for every method. Two studies:

    gsm8k      train on the first --train-examples GSM8K train problems; score held-out loss on the
               first --test-examples GSM8K test problems, and greedy accuracy on them
    multitask  train on a mix of GSM8K, CodeAlpaca and Saferpaca's safety instructions
               (--train-examples of each); score held-out loss per task on examples never trained
               on, and zero-shot MMLU (--mmlu-per-subject of each subject) and CommonsenseQA
               (--csqa-examples): does the adapter hurt or help general knowledge?

    python experiments/reproduce.py --study gsm8k --plan        # the runs, and which are done
    python experiments/reproduce.py --study gsm8k               # run what is missing (add --device cuda on a GPU)
    python experiments/reproduce.py --study gsm8k --table       # rebuild results/gsm8k/table.md and its plot

The protocol, per study:
  0. "base": the frozen model, untrained, scored the same way (the floor every method starts from);
  1. learning-rate search: every --lrs x every method, seed 0 (lr by lr, so a partial grid
     still compares methods at the same lr); full fine-tuning starts one decade lower (see FULL_LR);
  2. the best lr per method is the one with the lowest validation loss, on held-out examples that
     no run trains on and that are not the test examples; if it is at an edge of the grid, that
     method's grid grows by half a decade past the edge (--lr-extensions), the same rule for all;
  3. the main comparison (ID-LoRA r=128 vs LoRA r=16 and r=32; --seed-methods) runs again at its
     best lr with --seeds; the table gives the mean and spread over every seed at the best lr.
Methods are named <method>[-r<rank>][-k<k>][-noRB][-serial|-random] (e.g. hydralora-r16-k3, or
full), a method of baselines.METHODS with train.py's flags; --methods takes those in METHODS below.
Resumable: a finished run (results/<study>/<run>.json exists) is skipped, a half-finished one
continues from its checkpoint (a finished run's optimizer state, state.pt, is then deleted: for
a full fine-tune of SmolLM2 it is 1 GB). Several processes can share the grid, each taking the next
unclaimed run (on a CPU, e.g. two with OMP_NUM_THREADS=1 on 2 cores). Runs go to runs/repro/<study>/<run>/ (adapters and model folders: not committed);
results/<study>/*.json are small and committed.
"""

import argparse
import glob
import json
import os
import random
import re
import sys
import time

import torch

# Run as a script from anywhere: the project's modules (idlora, train, eval, data) are one folder up.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import baselines
import data
import eval as evaluate
import idlora
import train

# The methods of the studies, as names that say their settings (method_argv turns a name into
# train.py's flags; the method itself comes from baselines.METHODS, or is full fine-tuning).
# "w/o RB" is boost=1 at the rank with the same trainable count as boost=2 at r=128. On LLaMA-3-8B
# that is r=32 exactly (B: d_out x 32 = d_out/2 x 128/2). On SmolLM2 the k/v layers (192 rows < k*r)
# are clamped to rank 48 at boost 2 but not at boost 1, so r=32 would have 4.3% more; r=31 is the
# nearest (5,420,160 vs 5,345,280: +1.4%). The baselines are at the paper's settings (Tables 1-2).
# At r=128 ID-LoRA takes 89-100% of most SmolLM2 matrices' rows, so which rows it takes can hardly
# matter; at r=16 (64 rows) it takes 4-33%, close to LLaMA-3-8B's 4-50% at r=128: the r=16 ablations
# test PMRC where it can matter. idlora-r16-k4, idlora-r4-k4-noRB and lora-r4 have exactly the same
# trainable count on SmolLM2 (1,221,120): rank boosting and ID-LoRA against LoRA at equal size.
METHODS = ("idlora-r128-k4", "lora-r8", "lora-r16", "lora-r32", "idlora-r31-k4-noRB", "idlora-r128-k4-serial",
           "idlora-r128-k4-random", "idlora-r128-k2", "idlora-r128-k8",
           "dora-r32", "hydralora-r16-k3", "moelora-r8-k4", "full",
           "idlora-r16-k4", "idlora-r16-k4-serial", "idlora-r16-k4-random", "idlora-r4-k4-noRB", "lora-r4")
NAME = re.compile(r"(?P<method>[a-z]+)(?:-r(?P<r>\d+))?(?:-k(?P<k>\d+))?(?P<noRB>-noRB)?(?:-(?P<selection>serial|random))?")


def method_argv(name):
    """train.py's flags for a method name: idlora-r31-k4-noRB -> --method idlora --rank 31 --k 4 --boost 1."""
    m = NAME.fullmatch(name)
    if m is None or m["method"] not in list(baselines.METHODS) + ["full"]:
        raise ValueError(f"{name!r} is not <method>[-r<rank>][-k<k>][-noRB][-serial|-random] with a method "
                         f"from {list(baselines.METHODS) + ['full']}")
    flags = dict(rank=m["r"], k=m["k"], boost="1" if m["noRB"] else None, selection=m["selection"])
    return ["--method", m["method"]] + [x for flag, v in flags.items() if v for x in (f"--{flag}", v)]


def is_ablation(name):
    """ID-LoRA variants of the ablation study (other k, w/o RB, serial/random rows): not the paper's method."""
    m = NAME.fullmatch(name)
    return bool(m and (m["noRB"] or m["selection"] or (m["method"] == "idlora" and m["k"] not in (None, "4"))))


MAIN = ("idlora-r128-k4", "lora-r16", "lora-r32")
# The methods every other is compared with in the tables, a column each where it has results: the
# paper's ID-LoRA, and ID-LoRA r=16, the reference of the ablations at the 8B's fraction of rows.
REFERENCES = ("idlora-r128-k4", "idlora-r16-k4")
STUDIES = ("gsm8k", "multitask")
MULTITASK = {"gsm8k": "gsm8k", "code": "codealpaca", "safety": "saferpaca"}   # task -> data.load name


def run_name(method, lr, seed):
    return f"{method}_lr{lr:g}_s{seed}"


def result_path(args, name):
    return os.path.join(args.results, args.study, f"{name}.json")


def done(args, name):
    return os.path.exists(result_path(args, name))


LR_STEP = 10 ** 0.5      # one grid step past an edge: half a decade (2e-4 -> 6e-5, 2e-3 -> 6e-3)
# Full fine-tuning changes every weight directly, while an adapter's update starts at zero in a
# small subspace, scaled by alpha/r: full fine-tuning's usual learning rates are about a decade
# below LoRA's (Hu et al. 2022 and most LoRA studies since), and its grid starts one decade below
# --lrs (2e-5, 6e-5, 2e-4 by default). The same edge rule then grows it, so its searched range
# is as wide as every other method's.
FULL_LR = 0.1


def earlier_study(args):
    """The same study's args, reading its results from the --lrs-around or --lrs-from folder."""
    return argparse.Namespace(**{**vars(args), "results": args.lrs_around or args.lrs_from, "lrs_around": None,
                                 "lrs_from": None})


def start_grid(args, method):
    """The lrs a method's search starts from: --lrs (full fine-tuning: --lrs x FULL_LR); or, with
    --lrs-around DIR, the lr the method chose in the same study's results in DIR (replayed by
    lr_search) and the half-decade on each side of it, so a longer study starts where the shorter
    one ended, for every method alike; or, with --lrs-from DIR, that lr alone (no search: a study
    that changes one thing, e.g. --quantize, at the lrs already chosen)."""
    earlier_dir = args.lrs_around or args.lrs_from
    if not earlier_dir:
        return sorted(float(f"{lr * FULL_LR:.3g}") for lr in args.lrs) if method == "full" else sorted(args.lrs)
    best = lr_search(earlier_study(args), method)[1]
    if best is None:
        flag = "--lrs-around" if args.lrs_around else "--lrs-from"
        raise SystemExit(f"error: {flag} {earlier_dir}: {method} has no complete learning-rate "
                         f"search in {os.path.join(earlier_dir, args.study)}")
    if args.lrs_from:
        return [best]
    return [float(f"{best / LR_STEP:.0e}"), best, float(f"{best * LR_STEP:.0e}")]


def lr_search(args, method):
    """(grid, best): the lrs searched for `method` at seed 0, and the one with the lowest validation
    loss (None until every lr of the grid has a result). The search starts from start_grid; while the
    best lr sits at an edge of the grid, the grid grows by one step past that edge (at most
    --lr-extensions steps per edge), so no method's optimum is one the grid happened to cut off.
    One rule for every method; a grid of a single lr is taken as given."""
    start = start_grid(args, method)
    grid = list(start)
    while True:
        if not all(done(args, run_name(method, lr, 0)) for lr in grid):
            return grid, None
        val = {lr: json.load(open(result_path(args, run_name(method, lr, 0))))["val_loss"] for lr in grid}
        best = min(grid, key=val.get)
        if len(grid) > 1 and best == grid[0] and sum(lr < min(start) for lr in grid) < args.lr_extensions:
            grid.insert(0, float(f"{grid[0] / LR_STEP:.0e}"))
        elif len(grid) > 1 and best == grid[-1] and sum(lr > max(start) for lr in grid) < args.lr_extensions:
            grid.append(float(f"{grid[-1] * LR_STEP:.0e}"))
        else:
            return grid, best


def plan(args):
    """[(name, method, lr, seed)] in run order: the base model, the start grids (position by
    position, middle first, so a partial grid already compares every method at its likeliest lr,
    and at the same lr when they share a grid), any lr past an edge (see lr_search), then the extra
    seeds, seed by seed (a method's appear once its lr search is complete)."""
    starts = {m: start_grid(args, m) for m in args.methods}
    width = max(map(len, starts.values()))
    middle_first = sorted(range(width), key=lambda i: abs(i - (width - 1) / 2))
    runs = [("base", "base", 0.0, 0)] + [(run_name(m, g[i], 0), m, g[i], 0) for i in middle_first
                                         for m, g in starts.items() if i < len(g)]
    search = {m: lr_search(args, m) for m in args.methods}
    runs += [(run_name(m, lr, 0), m, lr, 0) for m, (grid, _) in search.items() for lr in grid if lr not in starts[m]]
    seeded = [(m, search[m][1]) for m in args.seed_methods if m in args.methods and search[m][1] is not None]
    runs += [(run_name(m, lr, s), m, lr, s) for s in args.seeds for m, lr in seeded]   # seed by seed
    return runs


def claim_path(args, name):
    return os.path.join(args.runs, args.study, f"{name}.claim")


def claim(args, name):
    """Take a run for this process, so several reproduce.py processes can share one grid (on a
    CPU, two 1-thread processes did 1.34x the work of one 2-thread process). A claim whose process
    has died is taken over."""
    path = claim_path(args, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        pid = open(path).read()
        if not pid:                                        # its owner is writing it right now
            return False
        try:
            os.kill(int(pid), 0)                           # signal 0: only "does it exist?"
        except ProcessLookupError:
            os.remove(path)
            return claim(args, name)
        except PermissionError:                            # exists, another user's
            pass
        return False
    with os.fdopen(fd, "w") as f:
        f.write(str(os.getpid()))
    return True


# -----------------------------------------------------------------------------
# The data of a study: train records, and held-out {task: records} for validation and test


def splits(args):
    n, v, t = args.train_examples, args.val_examples, args.test_examples
    gsm = data.load("gsm8k", "train", args.data_dir)
    gsm_test = data.load("gsm8k", "test", args.data_dir)[:t]
    if args.study == "gsm8k":
        return gsm[:n], {"gsm8k": gsm[n:n + v]}, {"gsm8k": gsm_test}
    train_set, val, test = [], {}, {}
    for task, name in MULTITASK.items():
        records = data.load(name, "train", args.data_dir)
        if task != "gsm8k":          # a fixed shuffle: the files may be grouped by topic
            records = random.Random(0).sample(records, len(records))
        need = n + v + (0 if task == "gsm8k" else t)      # GSM8K's test examples come from its test split
        if len(records) < need:
            raise ValueError(f"{name} has {len(records)} examples; --train-examples + --val-examples"
                             f"{'' if task == 'gsm8k' else ' + --test-examples'} need {need}")
        train_set += records[:n]
        val[task] = records[n:n + v]
        test[task] = gsm_test if task == "gsm8k" else records[n + v:n + v + t]
    return train_set, val, test


def train_file(out, records):
    """The multitask mix as one JSONL file for train.py --train-file, in the run's own folder and
    rewritten for every run, so a rerun with other --train-examples never trains on a stale mix."""
    path = os.path.join(out, "train.jsonl")
    os.makedirs(out, exist_ok=True)
    with open(path + ".tmp", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    os.replace(path + ".tmp", path)
    return path


def losses(args, model, tok, sets):
    """{task: mean NLL per response token} over each held-out set."""
    return {task: train.heldout_loss(model, tok, [train.to_pair(r) for r in records], args.max_len,
                                     device=args.device) for task, records in sets.items()}


# -----------------------------------------------------------------------------
# One run: train (unless done or "base"), then score


def train_run(args, out, method, lr, seed, records):
    argv = ["--task", args.study, "--model", args.model, "--epochs", str(args.epochs), "--lr", str(lr),
            "--seed", str(seed), "--max-len", str(args.max_len), "--batch-size", str(args.batch_size),
            "--micro-batch-size", str(args.micro_batch_size), "--output-dir", out, "--device", args.device,
            "--dtype", args.dtype,
            "--save-every", "5", "--no-grad-ckpt"] + (["--quantize", args.quantize] if args.quantize else [])
    if args.study == "gsm8k":
        argv += ["--max-examples", str(args.train_examples)]
    else:
        argv += ["--train-file", train_file(out, records)]
    if args.data_dir:
        argv += ["--data-dir", args.data_dir]
    if args.eval_at:
        argv += ["--save-at", ",".join(map(str, args.eval_at))]
    if os.path.exists(os.path.join(out, "state.pt")):
        argv.append("--resume")
    if not os.path.exists(os.path.join(out, "loss.png")):          # written when a run completes
        train.main(argv + method_argv(method))


def scores(args, out, method):
    """Accuracy from eval.py: GSM8K greedy (gsm8k study) or zero-shot MMLU and CSQA (multitask), of
    the base model, a run's adapter on it, or a full fine-tune's model folder."""
    model = ["--model", os.path.join(out, "model")] if method == "full" else ["--model", args.model]
    common = model + ["--device", args.device, "--dtype", args.dtype, "--output-dir", os.path.join(out, "eval"),
                      "--quantize", args.quantize or "none"]
    common += (["--adapter", out] if method not in ("base", "full") else []) + (["--data-dir", args.data_dir] if args.data_dir else [])
    if args.study == "gsm8k":
        tasks = {"gsm8k": (args.accuracy_examples, ["--max-new-tokens", str(args.max_new_tokens)])}
    else:
        tasks = {"mmlu": (args.mmlu_per_subject, ["--shots", "0"]), "csqa": (args.csqa_examples, [])}
    acc = {}
    for task, (limit, extra) in tasks.items():
        evaluate.main(["--task", task, "--limit", str(limit)] + common + extra)
        path = os.path.join(out, "eval", f"{task}-limit{limit}.json")      # eval.py's name for a --limit run
        acc[task] = json.load(open(path))["metrics"]["accuracy"]
    return acc


def learning_curve(args, out, val, test):
    """Held-out losses of the adapter as it was after each --eval-at step (train.py --save-at kept a
    copy): [{step, val_loss, test_loss}]. The lr still decays over the whole run, so these points show
    the trend; only the final one compares methods like for like."""
    points = []
    for step in args.eval_at:
        path = os.path.join(out, f"adapter-step{step}.safetensors")
        if not os.path.exists(path):                       # the run is shorter than this step
            continue
        model, tok = train.load_model(args.model, args.dtype, args.device)
        baselines.load_adapter(model, path)
        v, t = losses(args, model, tok, val), losses(args, model, tok, test)
        points.append(dict(step=step, val_loss=sum(v.values()) / len(v), test_loss=sum(t.values()) / len(t)))
    return points


def one_run(args, name, method, lr, seed, records, val, test):
    out = os.path.join(args.runs, args.study, name)
    if method != "base":
        train_run(args, out, method, lr, seed, records)
    log = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))] if method != "base" else []
    # Training time from train.py's log, each step's own seconds: whole even when the run was resumed
    # (this process's clock would count only the steps after the resume); null for a log without them.
    train_s = round(sum(r["seconds"] for r in log), 1) if all("seconds" in r for r in log) else None
    curve = learning_curve(args, out, val, test) if method != "base" and args.eval_at else None
    if method == "base":
        model, tok = train.load_model(args.model, args.dtype, args.device)
        if args.quantize:
            train.quantize_base(model, idlora.TARGETS, args.device)
    else:
        model, tok = train.load_trained(out, args.device, args.dtype, base=args.model)   # the adapter on the base, or model/
    val_loss, test_loss = losses(args, model, tok, val), losses(args, model, tok, test)
    row = dict(study=args.study, run=name, method=method, lr=lr, seed=seed,
               trainable=idlora.count_trainable(model) if method != "base" else 0,
               train_examples=len(records), epochs=args.epochs, max_len=args.max_len,
               steps=log[-1]["step"] if log else 0,
               val_loss=sum(val_loss.values()) / len(val_loss), val_loss_per_task=val_loss,
               test_loss=sum(test_loss.values()) / len(test_loss), test_loss_per_task=test_loss,
               test_examples={task: len(r) for task, r in test.items()},
               max_new_tokens=args.max_new_tokens if args.study == "gsm8k" else None,
               accuracy_examples=args.accuracy_examples if args.study == "gsm8k" else
               dict(mmlu_per_subject=args.mmlu_per_subject, csqa=args.csqa_examples))
    if curve is not None:           # the intermediate points, then the final one (the like-for-like comparison)
        row["curve"] = curve + [dict(step=row["steps"], val_loss=row["val_loss"], test_loss=row["test_loss"])]
    del model
    t1 = time.time()
    row.update(accuracy=scores(args, out, method), train_seconds=train_s,
               eval_seconds=round(time.time() - t1), device=args.device, dtype=args.dtype, model=args.model,
               quantize=args.quantize,
               threads=torch.get_num_threads())                    # CPU threads of this process
    os.makedirs(os.path.dirname(result_path(args, name)), exist_ok=True)
    with open(result_path(args, name) + ".tmp", "w") as f:
        json.dump(row, f, indent=1)
    os.replace(result_path(args, name) + ".tmp", result_path(args, name))
    if os.path.exists(os.path.join(out, "state.pt")):      # only --resume needs it, and the run is done
        os.remove(os.path.join(out, "state.pt"))
    print(f"{args.study}/{name}: val {row['val_loss']:.4f}  test {row['test_loss']:.4f}  {row['accuracy']}")


# -----------------------------------------------------------------------------
# The table and the plot, rebuilt from results/<study>/*.json alone


def table(args):
    """results/<study>/table.md: every run, then mean ± sd over the seeds at each method's best
    lr; and loss_vs_params.png: test loss against trainable parameters (the paper's Fig. 4)."""
    folder = os.path.join(args.results, args.study)
    rows = [json.load(open(p)) for p in sorted(glob.glob(os.path.join(folder, "*.json")))]
    if not rows:
        raise SystemExit(f"no results in {folder}")
    tasks = list(rows[0]["test_loss_per_task"])
    accs = list(rows[0]["accuracy"])
    per_task = tasks if len(tasks) > 1 else []
    head = ["run", "trainable", "val loss", "test loss"] + [f"{t} loss" for t in per_task] + [f"{a} acc" for a in accs]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["run"], f"{r['trainable']:,}", f"{r['val_loss']:.4f}", f"{r['test_loss']:.4f}"]
        cells += [f"{r['test_loss_per_task'][t]:.4f}" for t in per_task] + [f"{r['accuracy'][a]:.3f}" for a in accs]
        lines.append("| " + " | ".join(cells) + " |")
    chosen, grids = {}, {}
    for m in (m for m in METHODS if any(r["method"] == m for r in rows)):
        grids[m], lr = lr_search(args, m)
        at = [r for r in rows if r["method"] == m and r["lr"] == lr]
        if lr is not None and at:
            chosen[m] = at
    refs = {m: [r["test_loss"] for r in chosen.get(m, [])] for m in REFERENCES if m == MAIN[0] or m in chosen}
    before = same_method_before(args, chosen) if args.lrs_from else {}
    head = ["method", "lrs searched", "best lr", "seeds", "trainable", "test loss (mean ± sd)"] + \
        [f"minus {m} (Welch t)" for m in refs] + [f"minus the same in {args.lrs_from} (Welch t)"] * bool(before) + \
        [f"{t} loss" for t in per_task] + [f"{a} acc (mean)" for a in accs]
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m, at in chosen.items():
        grid, lr = grids[m], at[0]["lr"]
        loss = torch.tensor([r["test_loss"] for r in at])
        sd = f"{loss.std().item():.4f}" if len(at) > 1 else "n/a"
        cells = [m, ", ".join(f"{x:g}" for x in grid), f"{lr:g}", str(len(at)), f"{at[0]['trainable']:,}",
                 f"{loss.mean():.4f} ± {sd}"] + [gap(loss.tolist(), ref) if m != name else "" for name, ref in refs.items()]
        cells += [gap(loss.tolist(), before.get(m, []))] * bool(before)
        cells += [f"{sum(r['test_loss_per_task'][t] for r in at) / len(at):.4f}" for t in per_task]
        cells += [f"{sum(r['accuracy'][a] for r in at) / len(at):.3f}" for a in accs]
        lines.append("| " + " | ".join(cells) + " |")
    curves = {m: [r["curve"] for r in at if "curve" in r] for m, at in chosen.items()}
    curves = {m: c for m, c in curves.items() if c}
    if curves:
        lines += curve_table(curves)
        plot_curves(args, folder, curves)
    with open(os.path.join(folder, "table.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(args, folder, rows, chosen)


def same_method_before(args, chosen):
    """{method: test losses of its seeds at its chosen lr in the --lrs-from study}: a study that changes
    one thing (e.g. --quantize nf4) at the lrs already chosen is read as each method minus itself there."""
    earlier = earlier_study(args)
    before = {}
    for m in chosen:
        lr = lr_search(earlier, m)[1]
        paths = glob.glob(result_path(earlier, run_name(m, lr, "*"))) if lr is not None else []
        before[m] = [json.load(open(p))["test_loss"] for p in sorted(paths)]
    return before


def gap(a, b):
    """The cell "mean(a) - mean(b) (Welch t)": the difference in test loss between two methods'
    seeds and Welch's t, which does not assume equal spreads; the t needs 2 seeds on each side."""
    if not a or not b:
        return ""
    d = sum(a) / len(a) - sum(b) / len(b)
    if len(a) < 2 or len(b) < 2:
        return f"{d:+.4f}"
    se = (torch.tensor(a).var().item() / len(a) + torch.tensor(b).var().item() / len(b)) ** 0.5
    return f"{d:+.4f} ({d / se:+.1f})"


def curve_points(runs):
    """[(step, mean, min, max)] of the test loss over a method's seeds, step by step."""
    steps = sorted({p["step"] for c in runs for p in c})
    by_step = [[p["test_loss"] for c in runs for p in c if p["step"] == s] for s in steps]
    return [(s, sum(v) / len(v), min(v), max(v)) for s, v in zip(steps, by_step)]


def curve_table(curves):
    steps = sorted({p["step"] for runs in curves.values() for c in runs for p in c})
    lines = ["", "Test loss by training step at each method's best lr: mean over seeds (min to max). The lr decays "
             "over the whole run, so only the last step compares methods like for like.", "",
             "| method | seeds | " + " | ".join(f"step {s}" for s in steps) + " |", "|---|---|" + "---|" * len(steps)]
    for m, runs in curves.items():
        cells = {s: f"{mean:.4f} ({lo:.4f} to {hi:.4f})" for s, mean, lo, hi in curve_points(runs)}
        lines.append(f"| {m} | {len(runs)} | " + " | ".join(cells.get(s, "") for s in steps) + " |")
    at = lambda runs, s: [p["test_loss"] for c in runs for p in c if p["step"] == s]
    for m, runs in curves.items():       # each method minus ID-LoRA, step by step (Welch t)
        if m != MAIN[0] and MAIN[0] in curves:
            cells = [gap(at(runs, s), at(curves[MAIN[0]], s)) for s in steps]
            lines.append(f"| {m} minus {MAIN[0]} (Welch t) | | " + " | ".join(cells) + " |")
    return lines


def plot_curves(args, folder, curves):
    """learning_curves.png: test loss against training step, each method at its best lr, the mean
    over seeds with the range shaded."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    plt.figure(figsize=(6, 4))
    for m, runs in curves.items():
        steps, mean, lo, hi = zip(*curve_points(runs))
        line, = plt.plot(steps, mean, marker="o", markersize=3, label=f"{m} ({len(runs)} seed{'s' * (len(runs) > 1)})")
        plt.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.2)
    plt.xscale("log", base=2)
    plt.xticks(steps, [str(s) for s in steps])
    plt.xlabel("training step")
    plt.ylabel(f"{args.study} test loss (NLL / response token)")
    plt.title(f"{args.study}: held-out loss during training, best lr per method")
    plt.legend(fontsize=7)
    plt.grid(alpha=0.3)
    plt.tight_layout()
    plt.savefig(os.path.join(folder, "learning_curves.png"), dpi=120)
    plt.close()


def plot(args, folder, rows, chosen):
    """loss_vs_params.png. Left, the paper's Fig. 4 at small scale: test loss against trainable
    parameters, every trained run faint (one point per lr and seed), each method's best lr bold (the
    mean over its seeds), one colour and marker per method family, the untrained base as a dashed
    line; runs that did worse than the base (an lr far too high) are cut off. Right, the comparison
    itself: each method at its best lr, the mean over seeds with their range, best at the top. The
    ID-LoRA ablations (other k, w/o RB, serial/random rows) sit at nearly the same count as the ID-LoRA
    they vary, so they appear on the right only."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    trained = [r for r in rows if r["method"] != "base"]
    if not trained:
        return
    base = next((r["test_loss"] for r in rows if r["method"] == "base"), None)
    family = lambda method: NAME.fullmatch(method)["method"]
    families = [f for f in list(baselines.METHODS) + ["full"] if any(family(r["method"]) == f for r in trained)]
    style = {f: ("osD^vP*"[i % 7], f"C{i}") for i, f in enumerate(families)}
    loss = {m: [r["test_loss"] for r in at] for m, at in chosen.items()}
    mean = {m: sum(v) / len(v) for m, v in loss.items()}
    _, (left, right) = plt.subplots(1, 2, figsize=(11, max(4.2, 1.2 + 0.22 * len(loss))),
                                    gridspec_kw=dict(width_ratios=(3, 2)))
    for fam in families:
        marker, colour = style[fam]
        runs = [r for r in trained if family(r["method"]) == fam]
        left.scatter([r["trainable"] for r in runs], [r["test_loss"] for r in runs], marker=marker,
                     color=colour, alpha=0.3, s=15, label=f"{fam}: every run")
        best = [(chosen[m][0]["trainable"], mean[m]) for m in loss if family(m) == fam and not is_ablation(m)]
        left.scatter([n for n, _ in best], [l for _, l in best], marker=marker, color=colour, s=50,
                     label=f"{fam}: best lr, mean over seeds")
    if base:
        left.axhline(base, color="gray", linestyle="--", linewidth=1, label="base (untrained)")
        left.set_ylim(top=base + 0.05)
    left.set_xscale("log")
    left.set_xlabel("trainable parameters")
    left.set_ylabel(f"{args.study} test loss (NLL / response token)")
    left.set_title("every run; best lr bold")
    left.legend(fontsize=6)
    order = sorted(loss, key=lambda m: -mean[m])        # best ends at the top
    for y, m in enumerate(order):
        marker, colour = style[family(m)]
        right.errorbar(mean[m], y, xerr=[[mean[m] - min(loss[m])], [max(loss[m]) - mean[m]]],
                       fmt=marker, color=colour, capsize=3)
    right.set_yticks(range(len(order)), [f"{m}  ({chosen[m][0]['trainable'] / 1e6:.1f}M, {len(loss[m])} seed{'s' * (len(loss[m]) > 1)})"
                                         for m in order], fontsize=7)
    right.set_xlabel(f"{args.study} test loss at the best lr: mean, min to max")
    right.set_title("each method at its best lr")
    right.grid(axis="x", alpha=0.3)
    plt.suptitle(f"{args.study}: held-out loss against trainable parameters")
    plt.tight_layout()
    plt.savefig(os.path.join(folder, "loss_vs_params.png"), dpi=120)
    plt.close()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=train.Help)
    p.add_argument("--study", default="gsm8k", choices=STUDIES)
    p.add_argument("--plan", action="store_true", help="list the runs and which are done")
    p.add_argument("--table", action="store_true", help="only rebuild the table and plot")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of the methods")
    p.add_argument("--lrs", default="2e-4,6e-4,2e-3", help="the learning-rate grid to start from, the same for every method")
    lrs = p.add_mutually_exclusive_group()
    lrs.add_argument("--lrs-around", metavar="DIR", help="start each method's grid at the lr it chose in the same study's "
                     "results in DIR (e.g. results/cpu) and the half-decade on each side, instead of --lrs")
    lrs.add_argument("--lrs-from", metavar="DIR", help="train each method at the lr it chose in the same study's results "
                     "in DIR only, with no search (e.g. the same study on a 4-bit base)")
    p.add_argument("--eval-at", default="", help="comma-separated steps at which held-out loss is also recorded "
                   "(a learning curve from one run; the final step always is)")
    p.add_argument("--lr-extensions", type=int, default=2,
                   help="most grid steps added past each edge while a method's best lr sits there")
    p.add_argument("--seeds", default="1,2", help="extra seeds, each at a method's best lr")
    p.add_argument("--seed-methods", default=",".join(MAIN),
                   help="the methods that get --seeds (default: the main comparison; 'all' for every method)")
    p.add_argument("--model", default=train.EMBEDDED, help="base model of every run (train.py --model)")
    p.add_argument("--train-examples", type=int, default=2000, help="training examples (multitask: of each task)")
    p.add_argument("--val-examples", type=int, default=200, help="held-out examples per task for choosing lr")
    p.add_argument("--test-examples", type=int, default=200, help="held-out test examples per task")
    p.add_argument("--accuracy-examples", type=int, help="gsm8k: greedy accuracy on the first N test problems (default: --test-examples)")
    p.add_argument("--mmlu-per-subject", type=int, default=5, help="multitask: zero-shot MMLU, first N of each of 57 subjects")
    p.add_argument("--csqa-examples", type=int, default=300, help="multitask: first N CommonsenseQA validation questions")
    p.add_argument("--epochs", type=float, default=1, help="passes over the training examples")
    p.add_argument("--batch-size", type=int, default=32, help="examples per optimizer step")
    p.add_argument("--micro-batch-size", type=int, default=8, help="examples per forward/backward")
    p.add_argument("--max-len", type=int, default=384, help="tokens per example (prompt + response)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="greedy GSM8K answers")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda if available, else cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"],
                   help="base weights; every committed result is fp32, so new ones stay comparable (recorded in each file)")
    p.add_argument("--quantize", choices=["nf4"], help="train and score every method on a frozen 4-bit base (train.py "
                   "--quantize nf4, recorded in each file); --results and --runs must then name a folder with nf4 in its path")
    p.add_argument("--data-dir", help="folder with local data files (see data/README.md)")
    p.add_argument("--runs", default="runs/repro", help="training runs and checkpoints (not committed)")
    p.add_argument("--results", default="results", help="result files: <results>/<study>/<run>.json, table.md, plots")
    args = p.parse_args(argv)
    args.methods = [m for m in args.methods.split(",") if m]
    args.seed_methods = args.methods if args.seed_methods == "all" else [m for m in args.seed_methods.split(",") if m]
    unknown = [m for m in args.methods + args.seed_methods if m not in METHODS]
    if unknown:
        p.error(f"unknown method(s) {unknown}; known: {list(METHODS)}")
    args.lrs = [float(x) for x in args.lrs.split(",")]
    try:
        args.eval_at = sorted({int(x) for x in args.eval_at.split(",") if x})
    except ValueError:
        p.error(f"--eval-at takes step numbers like 16,32,64, got {args.eval_at!r}")
    for flag, folder in (("--lrs-around", args.lrs_around), ("--lrs-from", args.lrs_from)):
        if folder and not os.path.isdir(os.path.join(folder, args.study)):
            p.error(f"{flag}: no {args.study} results in {folder}")
    if args.quantize and "full" in args.methods:
        p.error(f"--quantize {args.quantize}: full fine-tuning has no frozen base to quantize; leave 'full' out of --methods")
    for flag, folder in (("--results", args.results), ("--runs", args.runs)):
        if args.quantize and args.quantize not in folder:
            p.error(f"--quantize {args.quantize}: {flag} {folder} must have {args.quantize} in its path (e.g. "
                    f"{folder.rstrip('/')}-{args.quantize}), so that 4-bit runs never mix with full-precision ones")
    args.seeds = [int(x) for x in args.seeds.split(",") if x]
    args.accuracy_examples = args.accuracy_examples or args.test_examples
    if args.table:
        return table(args)
    if args.plan:
        for name, *_ in plan(args):
            print(("done  " if done(args, name) else "todo  ") + name)
        return
    try:
        data_splits = splits(args)    # a missing or too small data set fails here, before any run
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    while True:
        todo = [r for r in plan(args) if not done(args, r[0])]
        if not todo:
            break
        run = next((r for r in todo if claim(args, r[0])), None)
        if run is None:                    # all taken by other workers: their results may add runs
            time.sleep(30)
            continue
        try:
            one_run(args, *run, *data_splits)
        finally:
            os.remove(claim_path(args, run[0]))
    table(args)


if __name__ == "__main__":
    main()
