"""
What ID-LoRA costs against LoRA and the other baselines (DoRA, HydraLoRA, MoELoRA: the paper's Fig. 3),
measured side by side on one model, batch and machine.

    python experiments/bench.py                                    # every section, embedded SmolLM2-135M, CPU float32
    python experiments/bench.py --help                             # every flag
    python experiments/bench.py --only params,train,infer --batch 2 --seq-len 128 --repeats 7
    python experiments/bench.py --configs base,lora:16,idlora:128:4:2,idlora:64:4:1
    python experiments/bench.py --only params,train,infer --configs base,lora:16,dora,hydralora,moelora,idlora
    python experiments/bench.py --only train --configs base,lora:16,hydralora,moelora --train-dropouts 0.05,0 --threads 1
                                                                   # what dropout costs (per-head masks vs the single path)
    python experiments/bench.py --only train,infer --dtype bf16 --configs base,lora:16,base@nf4,lora:16@nf4   # 4-bit base against bf16
    python experiments/bench.py --only cluster,cache,kmeans        # PMRC: LLaMA-3-8B shapes, cache, k-means settings
    python experiments/bench.py --device cuda --model-config llama-3-8b --batch 4 --seq-len 512   # the 8B on a GPU (random bf16 weights)
    python experiments/bench.py --device meta --model-config llama-3-8b --only params             # 8B counts, no memory used

Configurations (--configs, comma-separated), each a method of baselines.METHODS with its settings
in the table's order; a setting left out takes the table's (the paper's) value; alpha = 2R:
    base              the frozen base model alone (the reference for inference)
    lora:R            LoRA of rank R (the first one is the reference for every "vs" column but base's)
    dora:R            DoRA of rank R
    hydralora:R:K     HydraLoRA of rank R with K B heads (hydralora = hydralora:16:3)
    moelora:R:K       MoELoRA of rank R with K experts (moelora = moelora:8:4)
    idlora:R:K:M      ID-LoRA of rank R, K clusters, M rank-boosting divisions
    idlora:match:K:M  ID-LoRA with M divisions at the rank whose trainable count on this model is
                      nearest to the first idlora:R:K:M config's (the paper's 128:4:2 by default)
    ...@nf4           any of these on the same base layers quantized to NF4 (train.py --quantize nf4),
                      timed in the same rounds as on the full-precision base: base@nf4, lora:16@nf4, ...
Every mergeable method (LoRA, DoRA) is also timed merged in the inference section, as the paper's
Fig. 3 compares them: merged, they cost nothing at inference. All configurations are built once around
the SAME frozen base layers and swapped in and out of one model, and every timing is interleaved
(A B C, C B A, ...) so that drift on a shared machine hits them all alike; each figure is the median
over --repeats rounds, its ratio the median of the per-round ratios to the reference.

Sections (--only, comma-separated; default all):
    params   trainable parameters, bytes of every adapter tensor and buffer against the formula,
             bytes the patched model holds beyond the base (0 extra weight memory = only the adapter),
             the extra memory at inference (0 where the adapter merges), AdamW state bytes read from
             a real optimizer after one step
    memory   peak memory of a training step, each configuration in a fresh process: CUDA peak
             allocated on a GPU; on a CPU the peak RSS (VmHWM, reset just before the step) minus the
             RSS before it
    train    training step time (forward, backward, AdamW step) and tokens/s; with --train-dropouts,
             each configuration at each dropout rate, in the same rounds
    infer    forward latency of a batch (no grad, full logits) and greedy generation tokens/s with
             the KV cache (prefill included); LoRA and DoRA unmerged and merged
    layer    one adapted layer alone (--layer-shapes: LLaMA-3-8B's and SmolLM2's; --layer-tokens;
             --layer-dtypes): forward and forward+backward against the frozen layer and LoRA, in
             interleaved rounds, then each operator's own CPU time (torch.profiler): where an adapter's
             time goes when the frozen matmul is fast
    ops      the CPU-measurable proxy of GPU cost: operator calls and bytes allocated by ONE adapted
             layer of each LLaMA-3-8B shape (bf16, 4 x 512 tokens), forward and backward, for each
             arithmetic path (adapter in the base dtype, or in float32)
    cluster  PMRC seconds per LLaMA-3-8B matrix shape (RANDOM weights of those shapes: real weights
             may cluster at another speed), projected to all 224 matrices; then all 224 measured
             through idlora.row_indices with 1 and N processes
    cache    a second apply_idlora on LLaMA-3-8B: row_indices over 224 cached entries, with the
             weight fingerprint computed on real-size bf16 tensors (built one layer at a time)
    kmeans   how much the selected rows change with PMRC's n_init / max_iter / seed,
             on the real weights of --model's layers, and what each setting costs

On a CPU the model runs in float32 (bf16 matmuls are ~18x slower on CPUs without bf16
instructions); on CUDA in bf16. --model-config llama-3-8b builds the 8B architecture with random
weights (no download) and uses --selection random by default: clustering random weights is no use
for speed checks (the row choice does not change the cost of a gather). --layers N keeps the first
N decoder layers only, e.g. to check that code path on a CPU.

--compile compiles every decoder layer (torch.compile) in the train and infer sections; the warm-up
round, whose wall time is reported, pays the compilation.

On a small CPU shared with other busy processes, time with --threads 1 (the clock is then the thread's
CPU time, so time spent descheduled does not count): with 2 OpenMP threads on 2
cores, a descheduled thread stalls the other at every barrier and the timings scatter by 2-3x.
results/bench.md has the commands, tables and analysis of one such run (2-core AMD EPYC, no GPU).
"""

import argparse
import collections
import contextlib
import ctypes
import gc
import itertools
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
import types
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import torch

# Run as a script from anywhere: the project's modules (idlora, train, eval, data) are one folder up.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import baselines
import idlora
import nf4

SECTIONS = ("params", "memory", "train", "infer", "layer", "ops", "cluster", "cache", "kmeans")
DEFAULT_CONFIGS = "base,lora:16,lora:32,dora:32,hydralora:16:3,moelora:8:4,idlora:128:4:2,idlora:match:4:1"
CACHE = os.environ.get("IDLORA_CACHE", os.path.expanduser("~/.cache/idlora"))   # as train.py


def log(*a):
    """Progress goes to stderr; stdout carries only the markdown report."""
    print(*a, file=sys.stderr, flush=True)


# -----------------------------------------------------------------------------
# Configurations


@dataclass(frozen=True)
class Config:
    method: str             # base, or a method of baselines.METHODS
    settings: tuple = ()    # ((name, value), ...) in the table's order; idlora r = 0: "match", resolved later
    note: str = ""
    quantize: str = ""      # "nf4": on the same base layers in NF4 (name@nf4)

    @property
    def name(self):
        return ":".join([self.method] + [str(v or "match") for _, v in self.settings]) + \
            (f"@{self.quantize}" if self.quantize else "")

    def get(self, key):
        return dict(self.settings)[key]


def numeric_settings(method):
    """The settings a configuration spells out, in the table's order: r, then k, boost where the method has them."""
    return [k for k, v in baselines.METHODS[method].defaults.items() if isinstance(v, int)]


def parse_configs(text):
    configs = []
    for item in (s.strip() for s in text.split(",") if s.strip()):
        spec, _, quantize = item.partition("@")
        method, *values = spec.split(":")
        try:
            if quantize not in ("", "nf4"):
                raise ValueError
            if method == "base" and not values:
                configs.append(Config("base", quantize=quantize))
                continue
            keys = numeric_settings(method)              # KeyError: not a method
            if len(values) > len(keys):
                raise ValueError
            given = [0 if (method, i, v) == ("idlora", 0, "match") else int(v) for i, v in enumerate(values)]
            defaults = baselines.METHODS[method].defaults
            configs.append(Config(method, tuple((k, given[i] if i < len(given) else defaults[k]) for i, k in enumerate(keys)),
                                  quantize=quantize))
        except (KeyError, ValueError):
            raise SystemExit(f"error: bad configuration {item!r}; use base, or a method of {list(baselines.METHODS)} "
                             f"with its settings: lora:R, dora:R, hydralora:R:K, moelora:R:K, idlora:R:K:M or "
                             f"idlora:match:K:M; @nf4 after any of them for a 4-bit base")
    if len({c.name for c in configs}) < len(configs):
        raise SystemExit(f"error: a configuration is listed twice in {text!r}")
    return configs


def idlora_count(shapes, r, k, m):
    """Trainable numbers of ID-LoRA on layers of these (name, d_out, d_in) shapes, with the
    per-layer rank clamping apply_idlora does (idlora.fit_rank)."""
    total = 0
    for name, d_out, d_in in shapes:
        r_l = idlora.fit_rank(name, d_out, r, k, m)
        total += (d_out // m) * (r_l // m) + k * d_in
    return total


def resolve_matches(configs, shapes):
    """idlora:match:K:M -> the rank (a multiple of M) whose trainable count is nearest the first
    numeric idlora config's (idlora:128:K:2 if there is none)."""
    ref = next((c for c in configs if c.method == "idlora" and c.get("r")), None)
    out = []
    for c in configs:
        if c.method == "idlora" and not c.get("r"):
            k, m = c.get("k"), c.get("boost")
            rc = ref or Config("idlora", (("r", 128), ("k", k), ("boost", 2)))
            budget = idlora_count(shapes, rc.get("r"), rc.get("k"), rc.get("boost"))
            top = max(d_out for _, d_out, _ in shapes) // k
            r = min(range(m, top + 1, m), key=lambda r: (abs(idlora_count(shapes, r, k, m) - budget), r))
            c = Config("idlora", (("r", r), ("k", k), ("boost", m)), note=f"rank matching the budget of {rc.name}",
                       quantize=c.quantize)
        out.append(c)
    return out


# -----------------------------------------------------------------------------
# The model, and every configuration's adapter layers around the same frozen base layers


def resolve_dtype(name, device):
    """train.py's choice (auto: bf16 on CUDA and on CPUs with native bf16 matmuls), its one line on stderr."""
    import train
    with contextlib.redirect_stdout(sys.stderr):
        return train.resolve_dtype(name, device)


def build_model(args):
    """The model every section but ops and the PMRC ones measures; with --quantize, its target layers
    in 4 bits (a --model-config model is built one quantized layer at a time: train.random_model)."""
    import train
    dtype = resolve_dtype(args.dtype, args.device)
    if args.model_config:
        if args.model_config != "llama-3-8b":
            raise SystemExit(f"error: unknown --model-config {args.model_config!r}; known: llama-3-8b")
        config = idlora.llama3_8b_config()
        if args.layers:
            config.num_hidden_layers = args.layers
        if args.vocab_size:
            config.vocab_size = args.vocab_size
        model = train.random_model(config, dtype, args.device, args.quantize, targets(args))
    else:
        model, _ = train.load_model(args.model, dtype, args.device)
        if args.layers:
            model.model.layers = model.model.layers[: args.layers]
            model.config.num_hidden_layers = args.layers
        if args.quantize:
            with contextlib.redirect_stdout(sys.stderr):
                train.quantize_base(model, targets(args), args.device)
    model.config.use_cache = False        # training; generation asks for the cache explicitly
    return model


def targets(args):
    return tuple(t.strip() for t in args.targets.split(",") if t.strip())


def mergeable(c, args):
    """Timed merged too? LoRA and DoRA, on a full-precision base only (a 4-bit W0 cannot take the update)."""
    return baselines.mergeable(c.method) and not (args.quantize or c.quantize)


def full_precision(name, res):
    """For a run on the 4-bit base (name@nf4...), the same run on the full-precision base, if measured."""
    other = name.replace("@nf4", "")
    return other if other != name and other in res else None


def attach(model, c, args):
    """Patch `model` in place with configuration c through the table (alpha = 2r: the paper's
    alpha/r). What the patching prints goes to stderr, so stdout stays the markdown report."""
    with contextlib.redirect_stdout(sys.stderr):
        return baselines.apply(model, c.method, **dict(c.settings), dropout=args.dropout, targets=targets(args),
                               selection=args.selection, seed=args.seed, cache_dir=args.cluster_cache or None,
                               n_init=args.n_init, max_iter=args.max_iter, n_jobs=args.build_jobs, fp32=args.adapter_fp32)


def set_module(model, name, module):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


class Adapters:
    """Each configuration's adapter layers, built once around the SAME frozen nn.Linear objects,
    and swapped in and out of one model: the configurations share weights, inputs and memory,
    and switching costs nothing. Configurations @nf4 share the same layers quantized to NF4 once
    (the set "base@nf4"), so a method on the 4-bit base is timed in the same rounds as on the full one."""

    def __init__(self, model, configs, args):
        self.model = model
        self.base_layers = dict(idlora.find_targets(model, targets(args)))
        self.sets, self.reports = {}, {}
        if any(c.quantize for c in configs):
            self.sets["base@nf4"] = {n: nf4.NF4Linear(idlora.dense_weight(m), m.bias) for n, m in self.base_layers.items()}
        for c in configs:
            if c.method == "base":
                continue
            log(f"building {c.name}")
            if c.quantize:
                self.use("base@nf4")
            self.reports[c.name] = attach(model, c, args)
            self.sets[c.name] = {n: model.get_submodule(n) for n in self.base_layers}
            self.use("base")

    def use(self, name):
        """Swap configuration `name` in, in the model's train/eval mode (a set built or last used in
        the other mode would otherwise keep it: dropout in inference, say)."""
        for n, m in (self.base_layers if name == "base" else self.sets[name]).items():
            m.train(self.model.training)
            set_module(self.model, n, m)

    def params(self, name):
        return [p for m in self.sets[name].values() for p in m.parameters() if p.requires_grad]


def merge(wrappers, model):
    """Merged for inference: fold each adapter into W0 and put the plain nn.Linear back. Returns
    copies of the W0s, for unmerge."""
    saved = {}
    for n, w in wrappers.items():
        saved[n] = w.base.weight.detach().clone()
        w.merge()
        set_module(model, n, w.base)
    return saved


@torch.no_grad()
def unmerge(wrappers, saved):
    """Undo merge: the W0s back, bit for bit."""
    for n, w in wrappers.items():
        w.base.weight.copy_(saved[n])
        w.merged = False


@contextlib.contextmanager
def serving(ad, model, config, merged):
    """Configuration `config` swapped into `model` for inference, folded into W0 if `merged`; W0
    restored bit for bit and the plain base layers back afterwards."""
    ad.use(config)
    saved = merge(ad.sets[config], model) if merged else None
    try:
        yield
    finally:
        if merged:
            unmerge(ad.sets[config], saved)
        ad.use("base")


def compile_layers(model):
    """torch.compile each decoder layer, as train.py --compile does. Swapping a configuration's adapters in
    changes the layers' code, so each configuration compiles once (in the warm-up round) and keeps its
    own entry: the cache must hold them all, or dynamo falls back to eager (with a warning)."""
    import torch._dynamo
    import train
    torch._dynamo.config.cache_size_limit = 256     # a layer whose guards differ (its index) compiles on its own
    for layer in train.decoder_layers(model):
        layer.compile()


def set_fp32(modules, on):
    """Choose the adapters' arithmetic: float32 (on) or the base dtype (idlora.py, section 2)."""
    for m in modules:
        if hasattr(m, "fp32"):
            m.fp32 = on


def token_ids(model, batch, length, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (batch, length), generator=g)


# The clock of every timed section but PMRC's: wall time, or, on a CPU with --threads 1, this thread's
# CPU time (set in main). With one thread every operator, the backward included, runs on the calling
# thread, and on a shared machine the time it spends descheduled by other processes does not count
# (contention for caches and memory bandwidth still does).
clock = time.perf_counter


def compiled_note(args, res):
    """With --compile: the warm-up's wall seconds per configuration, which is when compilation happens."""
    if not args.compile:
        return ""
    return (" Every decoder layer compiled (torch.compile); warm-up wall seconds, compilation included: " +
            ", ".join(f"{n} {r['warmup'][0]:.0f}" for n, r in res.items()) + ".")


def use_thread_clock(args):
    return torch.device(args.device).type == "cpu" and args.threads == 1


def clock_note(args):
    return ("times are this thread's CPU time (1 thread: time descheduled by other processes does not count)"
            if use_thread_clock(args) else "times are wall-clock")


def train_step(model, opt, ids, sync):
    """One training step; returns (forward, backward, optimizer) seconds."""
    sync()
    t0 = clock()
    loss = model(input_ids=ids, labels=ids).loss
    sync()
    t1 = clock()
    loss.backward()
    sync()
    t2 = clock()
    opt.step()
    opt.zero_grad(set_to_none=True)
    sync()
    return t1 - t0, t2 - t1, clock() - t2


def make_sync(device):
    if torch.device(device).type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


def interleaved(names, fn, repeats, warmup):
    """{name: {key: [values]}}: fn(name) -> {key: value} run warmup rounds (discarded, but their wall
    seconds kept as "warmup": with --compile, the compilation), then `repeats` rounds in alternating
    order (A B C, C B A, ...)."""
    out = {n: {"warmup": [0.0]} for n in names}
    for _ in range(warmup):
        for n in names:
            t0 = time.perf_counter()
            fn(n)
            out[n]["warmup"][0] += time.perf_counter() - t0
    for i in range(repeats):
        for n in (names if i % 2 == 0 else names[::-1]):
            log(f"  round {i + 1}/{repeats}: {n}")
            for key, v in fn(n).items():
                out[n].setdefault(key, []).append(v)
    return out


def med(xs):
    return statistics.median(xs)


def paired_ratio(xs, refs):
    """Median of the per-round ratios: drift between rounds cancels."""
    return med([x / r for x, r in zip(xs, refs)])


def spread(xs):
    return f"{min(xs):.3g}-{max(xs):.3g}"


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(x) for x in row) + " |" for row in rows]
    print("\n".join(lines) + "\n", flush=True)


def gb(n):
    return f"{n / 1e9:.3f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def train_ref(configs):
    """The reference of every "vs" column: the first LoRA configuration."""
    return next((c.name for c in configs if c.method == "lora"), None)


# -----------------------------------------------------------------------------
# Sections


def tensor_bytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


def model_bytes(model):
    """Bytes of every distinct parameter and buffer the model holds."""
    return tensor_bytes(itertools.chain(model.parameters(), model.buffers()))


def section_params(model, ad, configs, args):
    print("## Trainable parameters, adapter memory, optimizer state\n")
    loras = [c.name for c in configs if c.method == "lora"]
    ref = train_ref(configs)
    n_base = sum(p.numel() for p in model.parameters())
    base_bytes = {}
    for q, name in (("", "base"), ("nf4", "base@nf4")):
        if name == "base" or name in ad.sets:
            ad.use(name)
            base_bytes[q] = model_bytes(model)
    ad.use("base")
    ids = token_ids(model, 1, 16, args.seed).to(args.device)
    rows, adapter_bytes = [], {}
    for c in configs:
        if c.method == "base":
            rows.append([c.name, "0", *[""] * len(loras), "", "0", "", "0", "", "0", "0"])
            continue
        ad.use(c.name)
        wrappers = ad.sets[c.name].values()
        n_train = idlora.count_trainable(model)
        measured = sum(tensor_bytes(itertools.chain(
            (p for n, p in w.named_parameters() if not n.startswith("base.")),
            (b for n, b in w.named_buffers() if not n.startswith("base.")))) for w in wrappers)
        formula = sum(baselines.METHODS[c.method].nbytes(*idlora.weight_shape(w.base), w) for w in wrappers)
        extra = model_bytes(model) - base_bytes[c.quantize]
        adapter_bytes[c.name] = measured
        bases = ad.sets["base@nf4"] if c.quantize else ad.base_layers
        no_copy = all(w.base is bases[n] for n, w in ad.sets[c.name].items())
        # AdamW state, read from a real optimizer after one step (on meta: zero gradients)
        params = ad.params(c.name)
        opt = torch.optim.AdamW(params, lr=1e-4)
        try:
            model.train()
            model(input_ids=ids, labels=ids).loss.backward()
        except Exception as e:                       # pragma: no cover (exotic devices)
            log(f"  {c.name}: no real backward on {args.device} ({type(e).__name__}); zero gradients")
            for p in params:
                p.grad = torch.zeros_like(p)
        opt.step()
        moments = sum(v.numel() * v.element_size() for s in opt.state.values()
                      for key, v in s.items() if key in ("exp_avg", "exp_avg_sq"))
        opt.zero_grad(set_to_none=True)
        del opt
        ratios = [f"{n_train / ad.reports[l]['trainable']:.2f}x" for l in loras]
        check = "yes" if measured == formula == extra and no_copy else "NO"
        vs_ref = f"{measured / adapter_bytes[ref]:.2f}x" if ref in adapter_bytes else ""
        at_inference = 0 if mergeable(c, args) else measured
        rows.append([c.name + (f" ({c.note})" if c.note else ""), f"{n_train:,}", *ratios,
                     f"{n_train / n_base:.2%}", f"{measured:,}", vs_ref, f"{extra:,}", check, f"{at_inference:,}",
                     f"{moments:,} ({moments / max(n_train, 1):.0f} B/param)"])
    ad.use("base")
    table(["config", "trainable", *[f"vs {l}" for l in loras], "% of base", "adapter tensors+buffers, bytes",
           f"vs {ref}", "model bytes beyond base", "= formula, no W0 copy", "extra bytes at inference",
           "AdamW moments, bytes"], rows)
    print(f"Base model: {n_base:,} parameters. Adapter formula per layer (spec section 3, float32): LoRA "
          f"r(d_in+d_out); DoRA r(d_in+d_out) + d_out; HydraLoRA r*d_in + k*r*d_out + k*d_in; MoELoRA "
          f"k*r(d_in+d_out) + k*d_in; ID-LoRA (d_out/m)(r/m) + k*d_in, plus 8*k*r bytes of int64 row indices. "
          f"'model bytes beyond base' counts every parameter and buffer of the patched model minus "
          f"the unpatched one's. 'extra bytes at inference': 0 for LoRA and DoRA, merged into W0; the "
          f"adapter's bytes for the others, which cannot be merged (the paper's Fig. 3).\n")


def _rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _reset_hwm():
    """Reset the peak RSS to the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _memory_child(args, c):
    """In a fresh process: build the model and configuration c, then measure the peak memory of
    --memory-steps training steps (the first creates the AdamW state)."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = build_model(args)
    if c.quantize:
        with contextlib.redirect_stdout(sys.stderr):
            import train
            train.quantize_base(model, targets(args), args.device)
    attach(model, c, args)
    if args.grad_ckpt:
        model.activation_checkpointing_enable()
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = token_ids(model, args.batch, args.seq_len, args.seed).to(args.device)
    cuda = torch.device(args.device).type == "cuda"
    with torch.no_grad():     # weights loaded from a memory-mapped file are resident only once read:
        for t in itertools.chain(model.parameters(), model.buffers()):   # read them all now, or the
            t.sum()           # first step's page faults would count as its memory (and PMRC's cache
    gc.collect()              # fingerprint, which reads every page, would hide them for ID-LoRA)
    if cuda:
        torch.cuda.synchronize()
        build = torch.cuda.max_memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)    # hand freed heap back so the step's growth shows
        except OSError:
            pass
        build = _hwm()        # the peak so far: loading (or building) and patching the model
        before = _rss()
        reset = _reset_hwm()
    t0 = time.perf_counter()
    for _ in range(args.memory_steps):
        train_step(model, opt, ids, make_sync(args.device))
    seconds = (time.perf_counter() - t0) / args.memory_steps
    if cuda:
        peak = torch.cuda.max_memory_allocated()
        return dict(before=before, peak=peak, reserved=torch.cuda.max_memory_reserved(), reset=True, build=build,
                    seconds=seconds)
    return dict(before=before, peak=_hwm(), reset=reset, build=build, seconds=seconds)


def section_memory(configs, args):
    print("## Peak memory of a training step (fresh process per configuration)\n")
    names = [c for c in configs if c.method != "base"]
    ctx = multiprocessing.get_context("spawn")

    def run(c):
        with ProcessPoolExecutor(1, mp_context=ctx) as pool:
            r = pool.submit(_memory_child, args, c).result()
        return dict(growth=r["peak"] - r["before"], peak=r["peak"], before=r["before"],
                    reset=float(r["reset"]), build=r["build"], seconds=r["seconds"])

    by_name = {c.name: c for c in names}
    res = interleaved([c.name for c in names], lambda n: run(by_name[n]), args.memory_repeats, 0)
    ref = train_ref(configs)
    cuda = torch.device(args.device).type == "cuda"
    rows = []
    for n, r in res.items():
        ratio = f"{paired_ratio(r['growth'], res[ref]['growth']):.3f}" if ref in res else ""
        rows.append([n, gb(med(r["growth"])), ratio, f"{spread([x / 1e6 for x in r['growth']])} MB",
                     gb(med(r["before"])), gb(med(r["peak"])), gb(med(r["build"])), f"{med(r['seconds']):.2f}"])
    what = "CUDA max allocated" if cuda else "peak RSS"
    table(["config", f"step peak - before ({what})", f"vs {ref}" if ref else "", "range", "before the step",
           f"{what}, absolute", "peak while loading and patching", "s per step"], rows)
    if not cuda and not all(all(r["reset"]) for r in res.values()):
        print("WARNING: the peak RSS could not be reset (/proc/self/clear_refs); the peak may be the "
              "model loading's.\n")
    print(f"{args.memory_steps} training steps of batch {args.batch} x {args.seq_len} tokens, gradient "
          f"checkpointing {'on' if args.grad_ckpt else 'off'}; median of {args.memory_repeats} "
          f"fresh processes, interleaved. 'before' includes the weights, the adapters and the inputs; "
          f"the growth includes the AdamW state created by the first step. 'peak while loading and patching' "
          f"is the process's peak before the step (with --quantize: one dense layer at a time, or the whole "
          f"loaded model for --model).\n")


def section_train(model, ad, configs, args):
    print("## Training step (forward, backward, AdamW step)\n")
    # Each configuration at each dropout rate of --train-dropouts (default: --dropout alone), all in
    # the same interleaved rounds; a rate is set on the configuration's layers before its step.
    ps = args.train_dropouts or [args.dropout]
    label = lambda n, p: n if len(ps) == 1 else f"{n} p={p:g}"
    runs = {label(c.name, p): (c.name, p) for c in configs if c.method != "base" for p in ps}
    ref = train_ref(configs) and label(train_ref(configs), ps[0])
    sync = make_sync(args.device)
    ids = token_ids(model, args.batch, args.seq_len, args.seed).to(args.device)
    opts = {n: torch.optim.AdamW(ad.params(n), lr=1e-4) for n, _ in runs.values()}
    model.train()

    def step(run):
        n, p = runs[run]
        ad.use(n)
        for m in ad.sets[n].values():
            m.dropout.p = p
        f, b, o = train_step(model, opts[n], ids, sync)
        return dict(step=f + b + o, fwd=f, bwd=b, opt=o)

    res = interleaved(list(runs), step, args.repeats, args.warmup)
    ad.use("base")
    rows = []
    for run, r in res.items():
        ratio = f"{paired_ratio(r['step'], res[ref]['step']):.3f}" if ref in res else ""
        vs_p = [f"{paired_ratio(r['step'], res[label(runs[run][0], ps[-1])]['step']):.3f}"] if len(ps) > 1 else []
        full = full_precision(run, res)
        vs_q = [f"{paired_ratio(r['step'], res[full]['step']):.3f}" if full else ""] if "base@nf4" in ad.sets else []
        rows.append([run, f"{med(r['step']):.3f}", ratio, *vs_p, *vs_q, spread(r["step"]),
                     f"{args.batch * args.seq_len / med(r['step']):,.0f}",
                     f"{med(r['fwd']):.3f}", f"{med(r['bwd']):.3f}", f"{med(r['opt']) * 1e3:.1f}"])
    table(["config", "step s (median)", f"vs {ref}", *([f"vs p={ps[-1]:g}"] if len(ps) > 1 else []),
           *(["4-bit vs full-precision base"] if "base@nf4" in ad.sets else []), "range s",
           "tokens/s", "forward s", "backward s", "AdamW ms"], rows)
    print(f"Batch {args.batch} x {args.seq_len} tokens, gradient checkpointing "
          f"{'on' if args.grad_ckpt else 'off'}, dropout {', '.join(f'{p:g}' for p in ps)}; {args.repeats} interleaved "
          f"rounds after {args.warmup} warm-up round(s); 'vs' is the median of per-round ratios; "
          f"{clock_note(args)}.{compiled_note(args, res)}\n")


def section_infer(model, ad, configs, args):
    print("## Inference: forward latency and greedy generation\n")
    from transformers import GenerationConfig
    sync = make_sync(args.device)
    names = []
    for c in configs:
        names.append(c.name)
        if c.method != "base" and mergeable(c, args):
            names.append(c.name + " merged")
    if "base" not in names:
        names.insert(0, "base")
    ids = token_ids(model, args.batch, args.seq_len, args.seed).to(args.device)
    gen_batch = args.gen_batch or args.batch
    prompt = token_ids(model, gen_batch, args.prompt_len, args.seed + 1).to(args.device)
    eos = model.config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    gc_ = GenerationConfig(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                           use_cache=True, pad_token_id=model.config.pad_token_id or eos or 0,
                           eos_token_id=eos)
    model.eval()

    def run(n):
        merged = n.endswith(" merged")
        with serving(ad, model, n.removesuffix(" merged"), merged), torch.inference_mode():
            sync()
            t0 = clock()
            model(input_ids=ids, use_cache=False)
            sync()
            t1 = clock()
            if args.compile:           # every decoding step is a new shape: it would compile again and again
                return dict(fwd=t1 - t0)
            out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), generation_config=gc_)
            sync()
            t2 = clock()
        assert out.shape[1] == args.prompt_len + args.new_tokens
        return dict(fwd=t1 - t0, gen=t2 - t1)

    res = interleaved(names, run, args.repeats, args.warmup)
    model.train()
    ref = f"{train_ref(configs)} merged"          # the paper's LoRA at inference (Fig. 3)
    vs_ref = lambda r, key: f"{paired_ratio(r[key], res[ref][key]):.3f}" if ref in res else ""
    quantized = "base@nf4" in ad.sets
    vs_full = lambda n, r, key: ([f"{paired_ratio(r[key], res[full_precision(n, res)][key]):.3f}"
                                  if full_precision(n, res) else ""] if quantized else [])
    rows = []
    for n, r in res.items():
        rows.append([n, f"{med(r['fwd']) * 1e3:.1f}", f"{paired_ratio(r['fwd'], res['base']['fwd']):.3f}",
                     vs_ref(r, "fwd"), *vs_full(n, r, "fwd"), spread([x * 1e3 for x in r["fwd"]]),
                     *([f"{gen_batch * args.new_tokens / med(r['gen']):.1f}",
                        f"{paired_ratio(r['gen'], res['base']['gen']):.3f}", vs_ref(r, "gen"), *vs_full(n, r, "gen")]
                       if "gen" in r else ["not timed with --compile"] * (3 + len(vs_full(n, r, "fwd"))))])
    q = ["4-bit vs full-precision base"] if quantized else []
    table(["config", "forward ms (median)", "vs base", f"vs {ref}", *q, "range ms", "generation tokens/s",
           "gen time vs base", f"gen time vs {ref}", *[f"gen {x}" for x in q]], rows)
    print(f"Forward: batch {args.batch} x {args.seq_len} tokens, no grad, full logits. Generation: batch "
          f"{gen_batch}, prompt {args.prompt_len} tokens, exactly {args.new_tokens} new tokens (greedy, KV "
          f"cache, prefill included); tokens/s counts new tokens. {args.repeats} interleaved rounds after "
          f"{args.warmup} warm-up round(s); ratios are medians of per-round ratios (> 1 = slower); "
          f"{clock_note(args)}.{compiled_note(args, res)}\n")


# Views and allocations launch no kernel: the rest of an op count is what a GPU pays per call.
NO_KERNEL = {"aten::view", "aten::_unsafe_view", "aten::reshape", "aten::_reshape_alias", "aten::t", "aten::transpose",
             "aten::permute", "aten::expand", "aten::as_strided", "aten::unsqueeze", "aten::squeeze", "aten::unflatten",
             "aten::flatten", "aten::select", "aten::slice", "aten::detach", "aten::alias", "aten::lift_fresh",
             "aten::empty", "aten::empty_strided", "aten::empty_like", "aten::resolve_conj", "aten::resolve_neg",
             "aten::numpy_T", "aten::contiguous", "aten::result_type"}


def op_profile(fn):
    """(aten calls, compute ops, bytes allocated) while fn() runs. Compute ops are the innermost
    operators that do work (an mm, a mul, a copy; not a view or a bare allocation): each is about one
    GPU kernel launch and one pass over its tensors. Bytes: what each operator itself allocated,
    net of what it freed, summed."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    ops = [e for e in prof.events() if e.name.startswith("aten::")]
    compute = [e for e in ops if e.name not in NO_KERNEL and
               all(c.name in NO_KERNEL for c in e.cpu_children if c.name.startswith("aten::"))]
    return len(ops), len(compute), sum(max(e.self_cpu_memory_usage, 0) for e in ops)


def layer_ops(layer, x, fp32):
    """op_profile of one training-mode forward and its backward through `layer` (x requires grad,
    as inside a network), with the adapter's arithmetic in float32 or in the base dtype."""
    if hasattr(layer, "fp32"):
        layer.fp32 = fp32
    layer.train()
    out = {}
    y = None

    def forward():
        nonlocal y
        y = layer(x)
    out["forward"] = op_profile(forward)
    g = torch.randn_like(y)
    out["backward"] = op_profile(lambda: y.backward(g))
    x.grad = None
    for p in layer.parameters():
        p.grad = None
    return out


def section_ops(args):
    print("## Operator calls and bytes allocated: one adapted layer of each LLaMA-3-8B shape, bf16\n")
    shapes, _ = llama_shapes()
    batch, seq = 4, 512
    g = torch.Generator().manual_seed(args.seed)
    rows = []
    for label, d_out, d_in, _ in shapes:
        base = torch.nn.Linear(d_in, d_out, bias=False, dtype=torch.bfloat16).requires_grad_(False)
        x = torch.randn(batch, seq, d_in, generator=g).to(torch.bfloat16).requires_grad_()
        idx = torch.randperm(d_out, generator=g)[: 4 * 128].view(4, 128)
        layers = {"base": base, "lora:16": idlora.LoRALinear(base, 16, 32, args.dropout),
                  "idlora:128:4:2": idlora.IDLoRALinear(base, idx, 256, 2, args.dropout)}
        for name, layer in layers.items():
            with torch.no_grad():                   # a trained adapter: B is no longer zero
                for n, p in layer.named_parameters():
                    if n == "B":
                        p.normal_(0, 0.01, generator=g)
            for fp32 in ((False,) if name == "base" else (False, True)):
                log(f"  ops: {d_out} x {d_in} {name} {'fp32' if fp32 else 'base dtype'}")
                r = layer_ops(layer, x, fp32)
                path = "" if name == "base" else (" float32" if fp32 else " bf16")
                rows.append([f"{d_out} x {d_in}", name + path,
                             *(f"{v:,}" for v in r["forward"][:2]), gb(r["forward"][2]),
                             *(f"{v:,}" for v in r["backward"][:2]), gb(r["backward"][2])])
        del base, layers, x
        gc.collect()
    table(["layer (d_out x d_in)", "config, adapter arithmetic", "forward aten calls", "forward compute ops",
           "forward bytes allocated", "backward aten calls", "backward compute ops", "backward bytes allocated"], rows)
    print(f"One nn.Linear in bf16 with random weights, alone or wrapped, in training mode (dropout "
          f"{args.dropout}), input {batch} x {seq} tokens that requires grad; B random, so the update is "
          f"not zero. From torch.profiler: 'aten calls' counts every aten operator call, nested ones "
          f"included; 'compute ops' the innermost ones that do work (not views or bare allocations), "
          f"about one GPU kernel each; 'bytes allocated' what each operator allocated, net of what it "
          f"freed, summed. The frozen layer's own GEMMs are in every row.\n")


# -----------------------------------------------------------------------------
# One adapted layer: where an adapter's time goes when the frozen matmul is fast


def adapted_layer(base, c, args):
    """Configuration c around the frozen nn.Linear `base` (or base itself), through the table like a
    whole model: `base` is the only target of a one-layer module. Every zero-initialised tensor (B)
    is made random, so the update is not zero."""
    if c.method == "base":
        return base
    holder = torch.nn.Module()
    holder.proj = base
    with contextlib.redirect_stdout(sys.stderr):          # a clamped rank's note
        baselines.apply(holder, c.method, **dict(c.settings), dropout=args.dropout, targets=("proj",),
                        selection="random", seed=args.seed, fp32=args.adapter_fp32)
    layer = holder.proj
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name == "B":
                p.normal_(0, 0.01)
    return layer


def infer_once(layer, x):
    """One forward as at inference: eval mode, under inference_mode."""
    with torch.inference_mode():
        layer.eval()
        layer(x)


def train_once(layer, xg, grad):
    """One forward in training mode (dropout on) and the backward of `grad`; xg requires grad, as x does
    inside a network. The gradients are cleared afterwards, so calls do not accumulate them."""
    layer.train()
    layer(xg).backward(grad)
    xg.grad = None
    for p in layer.parameters():
        p.grad = None


def op_times(fn):
    """{aten op: microseconds of its own (self) CPU time} over one call of fn, summed over the op's calls.
    An op nested in another (the copy inside an out-of-place addmm) counts apart from it."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key: e.self_cpu_time_total for e in prof.key_averages() if e.key.startswith("aten::")}


def section_layer(args):
    print("## One adapted layer: forward and forward+backward, and where the time goes\n")
    # "base" first, always; idlora:match is left out (its rank is matched on a whole model's layers)
    configs = parse_configs("base") + [c for c in parse_configs(args.configs) if c.method != "base" and c.get("r")]
    ref = train_ref(configs)
    g = torch.Generator().manual_seed(args.seed)
    sync = make_sync(args.device)
    rows, op_rows = [], []
    for dtype_name in args.layer_dtypes:
        dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[dtype_name]
        for d_out, d_in in args.layer_shapes:
            base = torch.nn.Linear(d_in, d_out, bias=False, dtype=dtype, device=args.device).requires_grad_(False)
            layers = {c.name: adapted_layer(base, c, args) for c in configs}
            for tokens in args.layer_tokens:
                log(f"  layer {d_out} x {d_in}, {tokens} tokens, {dtype_name}")
                x = torch.randn(tokens, d_in, generator=g).to(args.device, dtype)
                xg = x.clone().requires_grad_()
                grad = torch.randn(tokens, d_out, generator=g).to(args.device, dtype)

                calls = (("fwd", lambda layer: infer_once(layer, x)), ("fb", lambda layer: train_once(layer, xg, grad)))

                def timed(name):
                    out = {}
                    for key, fn in calls:
                        sync()
                        t0 = clock()
                        fn(layers[name])
                        sync()
                        out[key] = clock() - t0
                    return out

                res = interleaved(list(layers), timed, args.repeats, args.warmup)
                shape = f"{d_out} x {d_in}"
                for name, r in res.items():
                    fwd_vs = paired_ratio(r["fwd"], res["base"]["fwd"])
                    fb_vs = paired_ratio(r["fb"], res["base"]["fb"])
                    vs_ref = f"{paired_ratio(r['fb'], res[ref]['fb']):.3f}" if ref and name != "base" else ""
                    rows.append([shape, tokens, dtype_name, name, f"{med(r['fwd']) * 1e3:.3f}", f"{fwd_vs:.3f}",
                                 f"{med(r['fb']) * 1e3:.3f}", f"{fb_vs:.3f}", vs_ref])
                if args.device != "cpu" or tokens != min(args.layer_tokens):
                    continue
                # Where the time goes: each operator's own CPU time, 3 profiled calls per configuration, in turn.
                ops = {(name, key): collections.Counter() for name in layers for key in ("fwd", "fb")}
                for i in range(3):
                    for name in (list(layers) if i % 2 == 0 else list(layers)[::-1]):
                        for key, fn in calls:
                            ops[name, key].update(op_times(lambda: fn(layers[name])))
                top = lambda ops: ", ".join(f"{k.removeprefix('aten::')} {v / 3:,.0f}" for k, v in ops.most_common(8))
                op_rows += [[shape, dtype_name, name, top(ops[name, "fwd"]), top(ops[name, "fb"])] for name in layers]
            del base, layers
            gc.collect()
    table(["layer (d_out x d_in)", "tokens", "dtype", "config", "forward ms", "vs base", "fwd+bwd ms", "vs base",
           f"fwd+bwd vs {ref}"], rows)
    print(f"One nn.Linear without bias, random weights, alone ('base') or wrapped by each configuration (B "
          f"random, so the update is not zero). Forward: eval mode under inference_mode. Forward+backward: training mode "
          f"(dropout {args.dropout}), x requires grad (as inside a network), the backward of a given "
          f"gradient. {args.repeats} interleaved rounds after {args.warmup} warm-up; medians, and medians of "
          f"per-round ratios; {clock_note(args)}.\n")
    if op_rows:
        table(["layer", "dtype", "config", f"forward: own time per operator, us ({min(args.layer_tokens)} tokens)",
               "forward+backward: own time per operator, us"], op_rows)
        print("From torch.profiler (its own overhead included; 3 profiled calls, interleaved, averaged): each "
              "aten operator's own CPU time, the largest 8. mm/addmm include the frozen matmul; copy_ inside "
              "an addmm is the copy of its input an out-of-place addmm makes; _to_copy is a dtype cast.\n")


def llama_shapes():
    """(label, d_out, d_in, matrices per layer) of LLaMA-3-8B's seven projections."""
    c = idlora.llama3_8b_config()
    h, i = c.hidden_size, c.intermediate_size
    kv = c.num_key_value_heads * (h // c.num_attention_heads)
    return [("q_proj, o_proj", h, h, 2), ("k_proj, v_proj", kv, h, 2), ("gate_proj, up_proj", i, h, 2),
            ("down_proj", h, i, 1)], c.num_hidden_layers


def llama_layer(shapes, layer, make):
    """One LLaMA-3-8B layer's seven (name, module-like) pairs, weights from make(d_out, d_in)."""
    names = dict(q_proj="self_attn", k_proj="self_attn", v_proj="self_attn", o_proj="self_attn",
                 gate_proj="mlp", up_proj="mlp", down_proj="mlp")
    out = []
    for label, d_out, d_in, _ in shapes:
        for proj in label.split(", "):
            out.append((f"model.layers.{layer}.{names[proj]}.{proj}", types.SimpleNamespace(weight=make(d_out, d_in))))
    return out


def section_cluster(args):
    print("## PMRC clustering time, LLaMA-3-8B shapes (random weights)\n")
    shapes, n_layers = llama_shapes()
    g = torch.Generator().manual_seed(args.seed)

    def rand(d_out, d_in):
        return torch.randn(d_out, d_in, generator=g) * 0.02

    rows, per_layer = [], 0.0
    for label, d_out, d_in, count in shapes:
        w = rand(d_out, d_in)
        ts = []
        for _ in range(args.cluster_repeats):
            log(f"  cluster_rows {d_out}x{d_in}")
            t = time.perf_counter()
            idlora.cluster_rows(w, args.k, args.rank, "cluster", args.seed, args.n_init, args.max_iter)
            ts.append(time.perf_counter() - t)
        per_layer += count * med(ts)
        rows.append([f"{d_out} x {d_in}", label, f"{med(ts):.2f}", spread(ts), count * n_layers,
                     f"{count * n_layers * med(ts) / 60:.1f}"])
        del w
    table(["matrix", "projections", "s per matrix (1 process)", "range s", "matrices in 8B",
           "min for these, 1 process"], rows)
    total1 = per_layer * n_layers
    print(f"Sum over one layer: {per_layer:.1f} s; all {n_layers * 7} matrices, 1 process: "
          f"**{total1 / 60:.1f} min** (k={args.k}, r={args.rank}, n_init={args.n_init}, "
          f"max_iter={args.max_iter}, {torch.get_num_threads()} torch threads).\n")

    # The real thing: idlora.row_indices over all 224 matrices, as apply_idlora calls it, for each
    # n_jobs. All of them in float32 would take 28 GB, so each weight is made (seeded) when
    # row_indices reads it, and dropped after: the time includes making it (measured below).
    all_layers = [(n, LazyWeight(*ns.weight)) for layer in range(n_layers)
                  for n, ns in llama_layer(shapes, layer, lambda d_out, d_in: (d_out, d_in))]
    ranks = {n: idlora.fit_rank(n, lin.weight_shape[0], args.rank, args.k, 1) for n, lin in all_layers}
    t = time.perf_counter()
    for _, lin in all_layers[:7]:
        lin.weight
    make_s = (time.perf_counter() - t) * n_layers
    out = []
    for jobs in args.cluster_jobs:
        log(f"  row_indices, all {len(all_layers)} matrices, n_jobs={jobs}")
        t = time.perf_counter()
        idlora.row_indices(all_layers, ranks, args.k, "cluster", args.seed, args.n_init, args.max_iter, None, jobs)
        total = time.perf_counter() - t
        out.append([jobs, f"**{total / 60:.1f}**", f"{total1 / total:.2f}x",
                    "yes" if total <= 600 else f"no ({total / 600:.2f}x the 10 min)"])
    table(["n_jobs", f"measured min, all {len(all_layers)}", "vs the 1-process projection", "<= 10 min"], out)
    print(f"Measured through idlora.row_indices (worker threads = {os.cpu_count() or 1} cores / n_jobs), "
          f"including making each random N(0, 0.02) weight as it is read: {make_s / 60:.1f} min of the "
          f"total, in the main process. Real weights may converge in fewer iterations or take longer.\n")


class LazyWeight:
    """A module-like object whose .weight is a seeded N(0, 0.02) matrix made on each access."""
    seeds = itertools.count()

    def __init__(self, d_out, d_in):
        self.weight_shape = (d_out, d_in)
        self.seed = next(LazyWeight.seeds)

    @property
    def weight(self):
        g = torch.Generator().manual_seed(self.seed)
        return torch.randn(*self.weight_shape, generator=g) * 0.02


def section_cache(args):
    print("## PMRC cache: a second apply_idlora on LLaMA-3-8B\n")
    shapes, n_layers = llama_shapes()
    device = args.device if torch.device(args.device).type == "cuda" else "cpu"
    cache = tempfile.mkdtemp(prefix="bench-rows-")
    fp = {label: [] for label, *_ in shapes}
    total = 0.0
    try:
        for layer in range(n_layers):
            def make(d_out, d_in):   # real-size bf16 tensors with touched memory (values do not matter)
                return torch.full((d_out, d_in), 0.01 * (layer + 1), dtype=torch.bfloat16, device=device)
            lins = llama_layer(shapes, layer, make)
            ranks = {n: idlora.fit_rank(n, lin.weight.shape[0], args.rank, args.k, 1) for n, lin in lins}
            for n, lin in lins:       # the first run's result, written as apply_idlora writes it
                path = idlora._cache_path(cache, n, lin.weight, args.k, ranks[n], "cluster", args.seed,
                                          args.n_init, args.max_iter)
                torch.save(torch.arange(args.k * ranks[n]).view(args.k, ranks[n]), path)
            for label, d_out, d_in, _ in shapes:        # the fingerprint alone, per shape
                lin = next(l for n, l in lins if tuple(l.weight.shape) == (d_out, d_in))
                t = time.perf_counter()
                idlora._cache_path(cache, "x", lin.weight, args.k, args.rank, "cluster", args.seed,
                                   args.n_init, args.max_iter)
                fp[label].append(time.perf_counter() - t)
            t = time.perf_counter()
            idx = idlora.row_indices(lins, ranks, args.k, "cluster", args.seed, args.n_init, args.max_iter,
                                     cache, n_jobs=1)
            total += time.perf_counter() - t
            assert len(idx) == len(lins)
            del lins
            if layer % 8 == 7:
                log(f"  cache: {layer + 1}/{n_layers} layers")
    finally:
        import shutil
        shutil.rmtree(cache, ignore_errors=True)
    rows = [[label, f"{d_out} x {d_in}", f"{med(fp[label]) * 1e3:.2f}", count * n_layers]
            for label, d_out, d_in, count in shapes]
    table(["projections", "matrix (bf16)", "fingerprint ms (median)", "matrices"], rows)
    print(f"row_indices over all {n_layers * 7} cached entries (fingerprint + file check + torch.load), "
          f"timed layer by layer: **{total:.2f} s** (target <= 5 s: {'met' if total <= 5 else 'missed'}); "
          f"weights on {device}.\n")


def overlap(a, b):
    """(set overlap, cluster-matched overlap) of two (k, r) index sets, as fractions of k*r."""
    k, r = a.shape
    sa, sb = set(a.flatten().tolist()), set(b.flatten().tolist())
    inter = [[len(set(a[i].tolist()) & set(b[j].tolist())) for j in range(k)] for i in range(k)]
    best = max(sum(inter[i][p[i]] for i in range(k)) for p in itertools.permutations(range(k)))
    return len(sa & sb) / (k * r), best / (k * r)


def section_kmeans(args):
    print("## k-means settings: how much the selected rows change, and the time\n")
    import train
    model, _ = train.load_model(args.model, torch.float32, "cpu")
    layers = dict(idlora.find_targets(model, targets(args)))
    n_layers = model.config.num_hidden_layers
    which = [int(x) for x in args.kmeans_layers.split(",")] if args.kmeans_layers else \
        sorted({0, n_layers // 2, n_layers - 1})
    settings = [(1, 20, args.seed), (1, 20, args.seed + 1), (1, 10, args.seed), (1, 100, args.seed),
                (3, 20, args.seed), (3, 100, args.seed)]
    projs = [p for p in ("q_proj", "gate_proj", "down_proj") if p in targets(args)] or list(targets(args))[:1]
    rows = []
    times = {s: [] for s in settings}
    for proj in projs:
        for i in which:
            name = next(n for n in layers if f".layers.{i}." in n and n.endswith("." + proj))
            w = layers[name].weight
            r = idlora.fit_rank(name, w.shape[0], args.rank, args.k, 1)
            log(f"  k-means settings on {name}")
            J = {}
            for s in settings:
                t = time.perf_counter()
                J[s] = idlora.cluster_rows(w, args.k, r, "cluster", s[2], s[0], s[1])
                times[s].append(time.perf_counter() - t)
            ref = J[settings[0]]
            row = [f"{name} ({w.shape[0]}x{w.shape[1]})", f"{args.k * r / w.shape[0]:.0%}"]
            for s in settings[1:]:
                so, co = overlap(ref, J[s])
                row.append(f"{so:.0%} / {co:.0%}")
            rows.append(row)
    hdr = ["matrix (rows x cols)", "chance"] + [f"n_init={a} max_iter={b}" + (f" seed={c}" if c != args.seed else "")
                                               for a, b, c in settings[1:]]
    table(hdr, rows)
    table(["setting"] + [f"n_init={a} max_iter={b}" + (f" seed={c}" if c != args.seed else "") for a, b, c in settings],
          [["seconds per matrix (median)"] + [f"{med(times[s]):.2f}" for s in settings]])
    print(f"Each cell: the rows selected with that setting against n_init=1 max_iter=20 seed={args.seed}, "
          f"as 'same rows anywhere / same rows in matched clusters' (best cluster permutation), "
          f"fractions of the k*r selected rows. 'chance' = k*r/d_out, the overlap two random "
          f"selections would have. The seed={args.seed + 1} column is the noise floor: a setting that "
          f"changes the selection no more than a new seed does buys nothing. k={args.k}, rank {args.rank} "
          f"(clamped per layer as apply_idlora does); weights of {args.model}.\n")


# -----------------------------------------------------------------------------
# The GPU check (--suite gpu): one command, a few minutes on one GPU, figures to a file


def suite_gpu(args):
    """Time the frozen base, LoRA r=16 (merged and unmerged) and ID-LoRA r=128 k=4 m=2 under both
    adapter arithmetic paths (base dtype, the default; float32), interleaved, on LLaMA-3-8B shapes with
    random weights; then the peak memory of a training step (fresh process), and torch.compile of one
    adapted layer at the largest and the smallest target shape. Writes <--out>/gpu.json and gpu.md."""
    import json
    sync = make_sync(args.device)
    configs = parse_configs("base,lora:16,idlora:128:4:2")
    model = build_model(args)
    torch.manual_seed(args.seed)
    ad = Adapters(model, configs, args)
    if args.grad_ckpt:
        model.activation_checkpointing_enable()
    ids = token_ids(model, args.batch, args.seq_len, args.seed).to(args.device)
    sizes = sorted({idlora.weight_shape(m) for m in ad.base_layers.values()}, key=lambda s: (s[0] * s[1], s[0]))
    compile_shapes = list(dict.fromkeys((sizes[-1], sizes[0])))     # the largest and smallest: the 8B's gate/up, k/v

    def variant(name):                          # "lora:16 fp32" -> ("lora:16", True)
        config, _, path = name.partition(" ")
        return config, path == "fp32"

    # Training steps: the first variant of each method makes its AdamW state; every variant of a
    # method shares its tensors, so the optimizer is per method.
    steps = ["lora:16", "lora:16 fp32", "idlora:128:4:2", "idlora:128:4:2 fp32"]
    opts = {c: torch.optim.AdamW(ad.params(c), lr=1e-4) for c in ("lora:16", "idlora:128:4:2")}
    model.train()

    def step(name):
        config, fp32 = variant(name)
        ad.use(config)
        set_fp32(ad.sets[config].values(), fp32)
        return dict(step=sum(train_step(model, opts[config], ids, sync)))

    train = interleaved(steps, step, args.repeats, args.warmup)

    forwards = ["base", "lora:16 merged", "lora:16", "lora:16 fp32", "idlora:128:4:2", "idlora:128:4:2 fp32"]
    if args.quantize:                           # a 4-bit W0 cannot take a merge
        forwards.remove("lora:16 merged")
    model.eval()

    def forward(name):
        merged = name.endswith(" merged")
        config, fp32 = variant(name.removesuffix(" merged"))
        if config != "base":
            set_fp32(ad.sets[config].values(), fp32)
        with serving(ad, model, config, merged), torch.inference_mode():
            sync()
            t0 = time.perf_counter()
            model(input_ids=ids, use_cache=False)
            sync()
            return dict(fwd=time.perf_counter() - t0)

    infer = interleaved(forwards, forward, args.repeats, args.warmup)
    del model, ad, opts
    gc.collect()

    memory = {}                                   # peak of a training step, each in a fresh process
    ctx = multiprocessing.get_context("spawn")
    for name in ("lora:16", "idlora:128:4:2", "idlora:128:4:2 fp32"):
        config, fp32 = variant(name)
        log(f"  memory: {name}")
        child = argparse.Namespace(**{**vars(args), "adapter_fp32": fp32})
        with ProcessPoolExecutor(1, mp_context=ctx) as pool:
            memory[name] = pool.submit(_memory_child, child, parse_configs(config)[0]).result()["peak"] / 1e9

    compiled = compile_layer_times(args, compile_shapes, sync)

    def ratio(res, key, a, b):
        return paired_ratio(res[a][key], res[b][key])

    out = dict(
        idlora_step_vs_lora16=ratio(train, "step", "idlora:128:4:2", "lora:16"),
        idlora_forward_vs_base=ratio(infer, "fwd", "idlora:128:4:2", "base"),
        lora16_forward_vs_base=ratio(infer, "fwd", "lora:16", "base"),
        lora16_merged_forward_vs_base=None if args.quantize else ratio(infer, "fwd", "lora:16 merged", "base"),
        idlora_fp32_step_vs_lora16_fp32=ratio(train, "step", "idlora:128:4:2 fp32", "lora:16 fp32"),
        idlora_fp32_forward_vs_base=ratio(infer, "fwd", "idlora:128:4:2 fp32", "base"),
        lora16_fp32_forward_vs_base=ratio(infer, "fwd", "lora:16 fp32", "base"),
        idlora_step_fp32_vs_base_dtype=ratio(train, "step", "idlora:128:4:2 fp32", "idlora:128:4:2"),
        idlora_peak_gb=memory["idlora:128:4:2"], lora16_peak_gb=memory["lora:16"],
        idlora_fp32_peak_gb=memory["idlora:128:4:2 fp32"],
        step_seconds={n: dict(median=med(r["step"]), min=min(r["step"]), max=max(r["step"])) for n, r in train.items()},
        forward_seconds={n: dict(median=med(r["fwd"]), min=min(r["fwd"]), max=max(r["fwd"])) for n, r in infer.items()},
        compiled_layer=compiled,
        device=torch.cuda.get_device_name() if torch.device(args.device).type == "cuda" else machine(args),
        command="python experiments/bench.py " + " ".join(sys.argv[1:]),
        rounds=args.repeats, warmup=args.warmup, batch=args.batch, seq_len=args.seq_len,
        model=f"{args.model_config} (random weights" + (f", {args.layers} layers)" if args.layers else ")"),
        torch=torch.__version__, grad_ckpt=args.grad_ckpt, dropout=args.dropout, quantize=args.quantize)
    stem = "gpu" + (f"-{args.quantize}" if args.quantize else "")      # gpu.json, or gpu-nf4.json on a 4-bit base
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, stem + ".json"), "w") as f:
        json.dump(out, f, indent=1)
    lines = [f"# GPU check: {out['device']}", "", f"`{out['command']}`: {out['model']}"
             f"{', target layers in ' + args.quantize if args.quantize else ''}, batch {args.batch} x "
             f"{args.seq_len}, {args.repeats} interleaved rounds after {args.warmup} warm-up; medians, ranges "
             f"(min-max) and medians of per-round ratios.", "",
             "| variant | train step s | range | vs lora:16 (same path) | train tokens/s | forward ms | range | vs base "
             "| peak train GB |", "|---|---|---|---|---|---|---|---|---|"]
    for name in forwards:
        t, fw = train.get(name), infer[name]
        ref = "lora:16 fp32" if name.endswith("fp32") else "lora:16"
        cells = [name, f"{med(t['step']):.3f}" if t else "", spread(t["step"]) if t else "",
                 f"{ratio(train, 'step', name, ref):.3f}" if t else "",
                 f"{args.batch * args.seq_len / med(t['step']):,.0f}" if t else "", f"{med(fw['fwd']) * 1e3:.1f}",
                 spread([x * 1e3 for x in fw["fwd"]]), f"{ratio(infer, 'fwd', name, 'base'):.3f}",
                 f"{memory[name]:.2f}" if name in memory else ""]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "One adapted layer, eager against torch.compile: forward+backward ms, and the forward alone "
              "(inference_mode) in ms and as the median of per-round ratios to the frozen layer's:", "",
              "| layer | config | fwd+bwd eager | compiled | forward: frozen layer | eager | compiled | eager vs frozen "
              "| compiled vs frozen |", "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {c['layer']} | {c['config']} | {c['eager_ms']:.3f} | {c['compiled_ms']:.3f} | {c['base_forward_ms']:.3f} "
              f"| {c['eager_forward_ms']:.3f} | {c['compiled_forward_ms']:.3f} | {c['eager_forward_vs_base']:.3f} "
              f"| {c['compiled_forward_vs_base']:.3f} |" for c in compiled]
    with open(os.path.join(args.out, stem + ".md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return out


def compile_layer_times(args, shapes, sync):
    """One adapted layer of each (d_out, d_in) in `shapes` (on the 8B: 14336 x 4096, its largest, and 1024 x
    4096, its smallest), batch x seq-len tokens, LoRA r=16 and ID-LoRA r=128 k=4 m=2 built as the layer
    section builds them (adapted_layer: B random; the base-dtype path unless --adapter-fp32), eager against
    torch.compile: forward+backward (dropout on), and the forward alone (inference_mode)
    against the frozen layer's. Interleaved rounds of 10 calls after 2 warm-up rounds (the compilation).
    Does compiling the adapter's small ops pay, and how near the frozen layer does it bring the forward?
    A layer where torch.compile fails here is left out (reported)."""
    dtype = resolve_dtype(args.dtype, args.device)
    g = torch.Generator().manual_seed(args.seed)
    out = []
    for d_out, d_in in shapes:
        base = torch.nn.Linear(d_in, d_out, bias=False, dtype=dtype, device=args.device).requires_grad_(False)
        x = torch.randn(args.batch, args.seq_len, d_in, generator=g).to(args.device, dtype)
        xg = x.clone().requires_grad_()
        grad = torch.randn(args.batch, args.seq_len, d_out, generator=g).to(args.device, dtype)
        for c in parse_configs("lora:16,idlora:128:4:2"):
            layer = adapted_layer(base, c, args)
            arms = {"base": base, "eager": layer, "compiled": torch.compile(layer)}

            def run(arm, train, calls=10):
                sync()
                t0 = time.perf_counter()
                for _ in range(calls):
                    train_once(arms[arm], xg, grad) if train else infer_once(arms[arm], x)
                sync()
                return dict(ms=(time.perf_counter() - t0) / calls * 1e3)
            try:
                log(f"  torch.compile: {c.name}, {d_out} x {d_in}")
                step = interleaved(["eager", "compiled"], lambda a: run(a, True), args.repeats, 2)
                fwd = interleaved(["base", "eager", "compiled"], lambda a: run(a, False), args.repeats, 2)
            except Exception as e:                     # a missing compiler must not lose the other figures
                log(f"  torch.compile failed: {type(e).__name__}: {e}")
                continue
            out.append(dict(layer=f"{d_out} x {d_in}", config=c.name, eager_ms=med(step["eager"]["ms"]),
                            compiled_ms=med(step["compiled"]["ms"]), base_forward_ms=med(fwd["base"]["ms"]),
                            eager_forward_ms=med(fwd["eager"]["ms"]), compiled_forward_ms=med(fwd["compiled"]["ms"]),
                            eager_forward_vs_base=paired_ratio(fwd["eager"]["ms"], fwd["base"]["ms"]),
                            compiled_forward_vs_base=paired_ratio(fwd["compiled"]["ms"], fwd["base"]["ms"])))
    return out


def machine(args):
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import transformers
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.device(args.device).type == "cuda" else ""
    return (f"Machine: {cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads{gpu}; "
            f"torch {torch.__version__}, transformers {transformers.__version__}, Python "
            f"{platform.python_version()}; load average {os.getloadavg()[0]:.1f} at the start (other "
            f"processes compete for the cores: see --threads).")


def parse_args(argv=None):
    import train
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=train.Help)
    p.add_argument("--suite", choices=["gpu"], help="gpu: the one-command GPU check (base, LoRA r=16 merged and not, "
                   "ID-LoRA r=128 on both arithmetic paths, LLaMA-3-8B shapes, 4 x 512, memory, torch.compile), "
                   "written to --out/gpu.json and gpu.md (gpu-nf4.* with --quantize nf4); other flags still override its defaults")
    p.add_argument("--out", default=os.path.join("results", "bench"), help="--suite: folder for its files")
    p.add_argument("--adapter-fp32", action="store_true", help="adapters compute in float32 instead of the base dtype")
    p.add_argument("--compile", action="store_true", help="train and infer sections: torch.compile every decoder layer "
                                                          "(compiled in the warm-up round, whose wall time is reported)")
    p.add_argument("--only", default=",".join(SECTIONS), help=f"sections to run, from {','.join(SECTIONS)}")
    p.add_argument("--configs", default=DEFAULT_CONFIGS, help="base, lora:R, dora:R, hydralora:R:K, moelora:R:K, "
                                                             "idlora:R:K:M, idlora:match:K:M (see above)")
    p.add_argument("--model", default="smollm2", help="Hugging Face id or local folder; smollm2 = the embedded SmolLM2-135M-Instruct")
    p.add_argument("--model-config", help="llama-3-8b: that architecture with random weights, no download")
    p.add_argument("--layers", type=int, help="keep only the first N decoder layers (a slice, for code-path checks)")
    p.add_argument("--vocab-size", type=int, help="with --model-config: a smaller vocabulary, so that the LM head does not "
                                                  "dominate the timing of a few 8B-width layers")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, or meta (params only)")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"], help="base weights; auto = bf16 on CUDA and on CPUs with native bf16 matmuls, else fp32")
    p.add_argument("--quantize", choices=["nf4"], help="the target layers of the model the bench builds in 4 bits, as "
                   "train.py --quantize nf4 (params, memory, train, infer sections; LoRA and DoRA are not timed merged)")
    p.add_argument("--batch", type=int, default=2, help="micro-batch (examples) for training, forward and memory")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per example for training, forward and memory")
    p.add_argument("--no-grad-ckpt", dest="grad_ckpt", action="store_false", help="gradient checkpointing off (train.py's default is on)")
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--train-dropouts", help="train section: comma-separated dropout rates, each configuration timed at "
                                            "each in the same interleaved rounds, e.g. 0.05,0 (default: --dropout)")
    p.add_argument("--targets", default=",".join(idlora.TARGETS))
    p.add_argument("--repeats", type=int, default=5, help="interleaved timing rounds (train, infer)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--memory-repeats", type=int, default=2, help="fresh processes per configuration")
    p.add_argument("--memory-steps", type=int, default=2, help="training steps measured in each")
    p.add_argument("--gen-batch", type=int, help="generation batch (default: --batch)")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help="torch threads; on a small CPU shared with other busy processes, 1 thread gives far steadier "
                        "timings (a descheduled OpenMP thread stalls the others)")
    p.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("layer section (one adapted layer)")
    g.add_argument("--layer-shapes", default="4096x4096,1024x4096,14336x4096,4096x14336,576x576,192x576,1536x576,576x1536",
                   help="d_out x d_in of the layers: LLaMA-3-8B's q/o, k/v, gate/up, down, then SmolLM2-135M's")
    g.add_argument("--layer-tokens", default="256,2048", help="tokens per call (one batch of that many rows)")
    g.add_argument("--layer-dtypes", default="bf16,fp32", help="dtypes of the frozen layer (and the adapter's arithmetic)")
    g = p.add_argument_group("PMRC (ID-LoRA row clustering)")
    g.add_argument("--selection", choices=idlora.SELECTIONS, help="default: cluster; random with --model-config (random weights)")
    g.add_argument("--n-init", type=int, default=1)
    g.add_argument("--max-iter", type=int, default=20)
    g.add_argument("--cluster-cache", default=os.path.join(CACHE, "rows"), help="row-index cache for building the configs ('' = off)")
    g.add_argument("--build-jobs", type=int, default=min(8, os.cpu_count() or 1), help="processes for clustering when building (as train.py)")
    g.add_argument("--rank", type=int, default=128, help="cluster/cache/kmeans sections: r")
    g.add_argument("--k", type=int, default=4, help="cluster/cache/kmeans sections: k")
    g.add_argument("--cluster-jobs", default=f"1,{os.cpu_count() or 1}", help="cluster section: n_jobs values to measure")
    g.add_argument("--cluster-repeats", type=int, default=1, help="cluster section: fits per shape")
    g.add_argument("--kmeans-layers", help="kmeans section: layer numbers (default: first, middle, last); it always "
                                          "uses --model's real weights, never --model-config's random ones")
    if p.parse_known_args(argv)[0].suite == "gpu":        # its defaults; flags given still win
        p.set_defaults(device="cuda", model_config="llama-3-8b", batch=4, seq_len=512, repeats=5)
    args = p.parse_args(argv)
    if args.quantize and "@" in args.configs:
        p.error("--quantize nf4 puts every configuration on the 4-bit base: drop it to compare @nf4 configurations "
                "with full-precision ones")
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = [s for s in args.only if s not in SECTIONS]
    if bad:
        p.error(f"unknown section(s) {bad}; choose from {','.join(SECTIONS)}")
    if args.compile and args.warmup < 1:
        p.error("--compile needs --warmup 1 or more: the warm-up round is where compilation happens")
    args.cluster_jobs = sorted({int(x) for x in args.cluster_jobs.split(",")})
    try:
        args.layer_shapes = [tuple(int(d) for d in s.split("x")) for s in args.layer_shapes.split(",")]
        args.layer_tokens = [int(t) for t in args.layer_tokens.split(",")]
    except ValueError:
        p.error("--layer-shapes takes D_OUTxD_IN,... (e.g. 4096x4096,576x576) and --layer-tokens N,...")
    args.layer_dtypes = args.layer_dtypes.split(",")
    if set(args.layer_dtypes) - {"bf16", "fp32", "fp16"}:
        p.error(f"--layer-dtypes takes bf16, fp32, fp16, got {args.layer_dtypes}")
    try:
        args.train_dropouts = [float(x) for x in args.train_dropouts.split(",")] if args.train_dropouts else None
    except ValueError:
        p.error(f"--train-dropouts {args.train_dropouts!r}: give rates like 0.05,0")
    args.selection = args.selection or ("random" if args.model_config else "cluster")
    if torch.device(args.device).type == "meta" and set(args.only) - {"params"}:
        p.error("--device meta measures nothing but parameters: use --only params")
    return args


def main(argv=None):
    global clock
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    clock = time.thread_time if use_thread_clock(args) else time.perf_counter
    if args.suite == "gpu":
        return suite_gpu(args)
    configs = parse_configs(args.configs)
    print("# ID-LoRA vs LoRA: bench.py\n")
    print(machine(args))
    model_name = args.model_config and f"{args.model_config} (random weights" + \
        (f", first {args.layers} layers)" if args.layers else ")") or args.model
    print(f"Model: {model_name}, {resolve_dtype(args.dtype, args.device)} on {args.device}"
          f"{', target layers in ' + args.quantize if args.quantize else ''}; "
          f"sections: {','.join(args.only)}; command: `python experiments/bench.py {' '.join(sys.argv[1:])}`\n")

    model_sections = [s for s in ("params", "memory", "train", "infer") if s in args.only]
    if model_sections:
        log("loading the model")
        model = build_model(args)
        shapes = [(n, *idlora.weight_shape(m)) for n, m in idlora.find_targets(model, targets(args))]
        configs = resolve_matches(configs, shapes)
        print("Configurations: " + ", ".join(c.name + (f" ({c.note})" if c.note else "")
                                             for c in configs) + "\n")
        if "memory" in args.only:      # fresh processes first, while this one holds no adapters
            del model
            gc.collect()
            section_memory(configs, args)
            model = build_model(args)
        if set(model_sections) - {"memory"}:
            torch.manual_seed(args.seed)
            ad = Adapters(model, configs, args)
            if args.grad_ckpt:
                model.activation_checkpointing_enable()
            if args.compile:
                compile_layers(model)
            if "params" in args.only:
                section_params(model, ad, configs, args)
            if "train" in args.only:
                section_train(model, ad, configs, args)
            if "infer" in args.only:
                section_infer(model, ad, configs, args)
        del model
        gc.collect()
    if "layer" in args.only:
        section_layer(args)
    if "ops" in args.only:
        section_ops(args)
    if "cluster" in args.only:
        section_cluster(args)
    if "cache" in args.only:
        section_cache(args)
    if "kmeans" in args.only:
        section_kmeans(args)


if __name__ == "__main__":
    main()
