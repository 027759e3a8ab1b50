"""Tests of nf4.py and of every method on a 4-bit base and on GPT-2's Conv1D: the NF4 format (QLoRA's
levels, the nearest code, a bound on the error, 4.127 bits per weight), the layer's output and input
gradient against F.linear on its dequantized weight; each method on the 4-bit base against the same
method on a plain base holding the dequantized weights (outputs and gradients), zero-init, save then
load on a freshly quantized base, DoRA's cached row-norm terms, merging refused; GPT-2 (tiny, random)
patched by every method, saved, loaded and merged; bitsandbytes' Linear4bit where it is installed.

    pytest tests/test_nf4.py       (CPU; the bitsandbytes test is skipped without bitsandbytes)
"""

import copy
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig

import baselines
import idlora
from conftest import layers, perturb
import nf4
from baselines import METHODS

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
SMALL = dict(idlora=dict(r=8, k=4), lora=dict(r=4), dora=dict(r=4), hydralora=dict(r=4, k=3), moelora=dict(r=4, k=4))
GPT2 = ("c_attn", "c_proj", "c_fc")


def tiny(dtype=torch.float32):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(LlamaConfig(**TINY)).to(dtype).eval()


def gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                      bos_token_id=0, eos_token_id=0)).eval()


def batch(seed=0, n=2, t=12):
    return torch.randint(0, TINY["vocab_size"], (n, t), generator=torch.Generator().manual_seed(seed))


def unpack(codes):
    """(n_blocks, 32) bytes -> (n_blocks, 64) codes 0..15, high nibble first."""
    return torch.stack([codes >> 4, codes & 15], -1).flatten(-2).long()


# -----------------------------------------------------------------------------
# The format


def test_the_levels_are_qloras():
    """QLoRA's create_normal_map(offset=0.9677083): 8 positive and 7 negative N(0, 1) quantiles, and 0,
    divided by the largest; computed as bitsandbytes does (float32 linspace, float64 quantiles)."""
    offset = 0.9677083
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, 9)[:-1].double()).float()
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, 8)[:-1].double()).float()
    levels = torch.cat([pos, torch.zeros(1), neg]).sort().values
    assert torch.equal(levels / levels.max(), nf4.NF4)
    assert nf4.NF4[7] == 0 and nf4.NF4[0] == -1 and nf4.NF4[15] == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_codes_are_the_nearest_levels_and_the_error_is_bounded(dtype):
    torch.manual_seed(0)
    w = (torch.randn(256, 192) * 0.02).to(dtype)
    w[3] = 0                                                      # three whole blocks of zeros
    layer = nf4.NF4Linear(w)
    blocks = w.float().reshape(-1, 64)
    absmax = blocks.abs().amax(1)
    scaled = blocks / absmax.clamp_min(1e-12)[:, None]
    nearest = (scaled[..., None] - nf4.NF4).abs().argmin(-1)       # (n_blocks, 64)
    codes = unpack(layer.codes)
    tie = ((scaled[..., None] - nf4.NF4).abs().sort(-1).values.diff(dim=-1)[..., 0] < 1e-6)   # two levels as near
    assert ((codes == nearest) | tie).all() and (codes != nearest).sum() <= tie.sum()
    # the double-quantized absmax is off by at most half an int8 step of its block of 256
    step = (absmax - absmax.mean()).abs().max() / 127
    assert (layer.absmax() - absmax).abs().max() <= step / 2 + 1e-7
    # each value is off by at most half the widest gap between levels (0.152) of its absmax, plus the absmax's error
    err = (layer.dequantize(torch.float32).reshape(-1, 64) - blocks).abs()
    half_gap = (nf4.NF4.diff().max() / 2).item()
    assert (err <= half_gap * absmax[:, None] + step / 2 + 1e-6).all()
    rel = (layer.dequantize(torch.float32) - w.float()).norm() / w.float().norm()
    assert 0.08 < rel < 0.1                                        # QLoRA's error on normal weights (0.092)
    assert torch.equal(layer.dequantize(torch.float32)[3], torch.zeros(192))
    assert layer.dequantize().dtype == dtype


def test_chunks_change_nothing(monkeypatch):
    """Quantizing and dequantizing go CHUNK (dequantize) or 16 CHUNK (quantize) blocks at a time: with
    chunks of 1 and 16 blocks, the same codes, scales and weight."""
    w = torch.randn(96, 640) * 0.02                                  # 960 blocks
    whole = nf4.NF4Linear(w)
    want = whole.dequantize()
    monkeypatch.setattr(nf4, "CHUNK", 1)
    chunked = nf4.NF4Linear(w)
    assert all(torch.equal(a, b) for a, b in zip(whole.buffers(), chunked.buffers()))
    assert torch.equal(chunked.dequantize(), want)


def test_storage_is_4127_bits_per_weight():
    layer = nf4.NF4Linear(torch.randn(1024, 1024))
    n = 1024 * 1024
    nbytes = sum(b.numel() * b.element_size() for b in layer.buffers())
    assert nbytes == n // 2 + n // 64 + 4 * (n // 64 // 256) + 4     # codes, int8 absmaxes, their scales, the mean
    assert round(8 * nbytes / n, 3) == 4.127
    assert not list(layer.parameters())                             # nothing to train, no bias here


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_and_input_gradient_equal_f_linear_on_the_dequantized_weight(dtype):
    torch.manual_seed(0)
    layer = nf4.NF4Linear((torch.randn(96, 128) * 0.02).to(dtype), torch.randn(96).to(dtype))
    x = torch.randn(3, 5, 128, dtype=dtype, requires_grad=True)
    y = layer(x)
    g = torch.randn_like(y)
    y.backward(g)
    x2 = x.detach().requires_grad_()
    y2 = F.linear(x2, layer.dequantize(dtype), layer.bias)
    y2.backward(g)
    assert torch.equal(y, y2) and torch.equal(x.grad, x2.grad)
    assert not layer.bias.requires_grad


def test_model_to_bf16_keeps_the_scales_exact():
    layer = nf4.NF4Linear(torch.randn(64, 128) * 0.02)
    before = layer.dequantize(torch.float32)
    layer.to(torch.bfloat16)
    assert torch.equal(layer.dequantize(torch.float32), before)


def test_quantize_swaps_the_targets_only_and_frees_their_weights():
    model = tiny()
    ids = batch()
    with torch.no_grad():
        dense = model(ids).logits
    assert nf4.quantize(model) == 14 and nf4.quantize(model) == 0  # twice: nothing left to do
    assert {type(model.get_submodule(n)).__name__ for n, _ in idlora.find_targets(model, idlora.TARGETS)} == {"NF4Linear"}
    assert type(model.lm_head) is nn.Linear and type(model.model.embed_tokens) is nn.Embedding
    assert not any("proj.weight" in n for n, _ in model.named_parameters())
    with torch.no_grad():
        rel = (model(ids).logits - dense).norm() / dense.norm()
    assert 0 < rel < 0.2
    with pytest.raises(ValueError, match=r"NF4 needs a weight with a multiple of 64 values, got \(10, 3\)"):
        nf4.NF4Linear(torch.randn(10, 3))


# -----------------------------------------------------------------------------
# Every method on the 4-bit base


def quantized_and_dequantized(dtype=torch.float32):
    """(a tiny LLaMA with NF4 targets, the same LLaMA whose target nn.Linears hold the dequantized weights)."""
    q = tiny(dtype)
    nf4.quantize(q)
    plain = tiny(dtype)
    with torch.no_grad():
        for name, lin in idlora.find_targets(plain, idlora.TARGETS):
            lin.weight.copy_(q.get_submodule(name).dequantize())
    return q, plain


def patch_both(method, dropout=0.0, dtype=torch.float32):
    q, plain = quantized_and_dequantized(dtype)
    for model in (q, plain):
        torch.manual_seed(1)
        baselines.apply(model, method, dropout=dropout, selection="cluster", **SMALL[method])
        perturb(model)
    return q, plain


@pytest.mark.parametrize("dropout", [0.0, 0.2])
@pytest.mark.parametrize("method", list(METHODS))
def test_each_method_on_nf4_equals_it_on_the_dequantized_base(method, dropout):
    """Same rows from PMRC (it clusters the dequantized rows), same outputs, same gradient of every
    trainable tensor, in training mode with dropout too (the same masks from the same seed)."""
    q, plain = patch_both(method, dropout)
    assert q.adapter_config["quantize"] == "nf4" and plain.adapter_config["quantize"] is None
    ids = batch()
    out = []
    for model in (q, plain):
        model.train()
        torch.manual_seed(5)
        loss = model(input_ids=ids, labels=ids)
        loss.loss.backward()
        out.append((loss.logits, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (a, ga), (b, gb) = out
    assert torch.equal(a, b)
    assert ga.keys() == gb.keys() and all(torch.equal(ga[n], gb[n]) for n in ga)
    if method == "idlora":
        assert all(torch.equal(x.idx, y.idx) for x, y in zip(layers(q).values(), layers(plain).values()))


@pytest.mark.parametrize("method", list(METHODS))
def test_zero_init_is_the_4bit_base_exactly(method):
    base = tiny()
    nf4.quantize(base)
    model = copy.deepcopy(base)
    baselines.apply(model, method, dropout=0.0, selection="cluster", **SMALL[method])
    ids = batch()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base(ids).logits)


@pytest.mark.parametrize("method", list(METHODS))
def test_save_then_load_on_a_freshly_quantized_base(tmp_path, method, capsys, monkeypatch):
    model = tiny()
    nf4.quantize(model)
    baselines.apply(model, method, dropout=0.0, selection="cluster", **SMALL[method])
    perturb(model)
    path = str(tmp_path / "adapter.safetensors")
    idlora.save_adapter(model, path)
    assert idlora.read_adapter_config(path)["quantize"] == "nf4"
    ids = batch()
    with torch.no_grad():
        want = model(ids).logits
    dense = tiny()                                                   # an adapter of a full-precision base
    baselines.apply(dense, method, dropout=0.0, selection="serial", **SMALL[method])
    idlora.save_adapter(dense, str(tmp_path / "dense.safetensors"))
    monkeypatch.setattr(idlora, "cluster_rows", None)                # loading never clusters
    fresh = tiny()                                                   # full precision: quantized by the loader
    capsys.readouterr()
    baselines.load_adapter(fresh, path)
    assert capsys.readouterr().out == (f"{path} was trained on a nf4 base: this base's 14 adapted layers are "
                                       f"quantized to nf4 too\n")
    assert fresh.adapter_config["quantize"] == "nf4"
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, want)
    plain = tiny()
    baselines.load_adapter(plain, path, quantize=False)              # scored on full precision: a warning
    assert capsys.readouterr().out == (f"warning: {path} was trained on a nf4 base and is loaded on a full-precision "
                                       f"one: its outputs are not those of the model it trained\n")
    on_nf4 = tiny()
    nf4.quantize(on_nf4)
    baselines.load_adapter(on_nf4, str(tmp_path / "dense.safetensors"))
    assert capsys.readouterr().out.startswith(f"warning: {tmp_path}/dense.safetensors was trained on a "
                                              f"full-precision base and is loaded on a nf4 one")


def test_the_pmrc_cache_key_holds_the_quantization(tmp_path):
    q, plain = quantized_and_dequantized()
    name = "model.layers.0.self_attn.q_proj"
    a, b = q.get_submodule(name), plain.get_submodule(name)
    assert torch.equal(idlora.dense_weight(a), idlora.dense_weight(b))            # the very same rows
    keys = [idlora._cache_path(str(tmp_path), name, idlora.dense_weight(x), 4, 8, "cluster", 0, 1, 20,
                               idlora.quantization(x)) for x in (a, b)]
    assert keys[0] != keys[1]
    assert keys[1] == idlora._cache_path(str(tmp_path), name, b.weight, 4, 8, "cluster", 0, 1, 20)  # old entries still valid
    idlora.apply_idlora(q, r=8, k=4, cache_dir=str(tmp_path))
    assert any(keys[0].endswith(os.path.basename(p)) for p in os.listdir(tmp_path))


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_merging_into_a_4bit_base_is_refused(method):
    q, _ = patch_both(method)
    layer = layers(q)["model.layers.0.mlp.up_proj"]
    with pytest.raises(ValueError, match="cannot merge into a 4-bit base: .* merge there"):
        layer.merge()
    assert not layer.merged


# DoRA's terms of n that read W0 are kept until A or W0 changes


def count_dequantize(monkeypatch):
    calls = []
    real = nf4.NF4Linear.dequantize
    monkeypatch.setattr(nf4.NF4Linear, "dequantize", lambda self, dtype=None: calls.append(1) or real(self, dtype))
    return calls


def fresh_norms(model):
    """Every DoRA layer's n, computed afresh."""
    out = []
    for layer in layers(model).values():
        layer._frozen = None
        out.append(layer.weight_norm(torch.float32))
    return out


@pytest.mark.parametrize("opt_kw", [dict(), dict(foreach=True), dict(fused=True)])
def test_dora_recomputes_its_w0_terms_once_per_step(opt_kw, monkeypatch):
    """Micro-batches reuse the terms (one dequantization for the base's forward, one for its backward);
    an optimizer step (plain, foreach or fused AdamW) changes A in place, and the next n reads W0 once
    more and equals n computed afresh."""
    q, _ = patch_both("dora")
    q.train()
    ids = batch()
    opt = torch.optim.AdamW([p for p in q.parameters() if p.requires_grad], lr=1e-2, **opt_kw)
    calls = count_dequantize(monkeypatch)
    q(input_ids=ids, labels=ids).loss.backward()                     # perturb changed A: the terms are made again
    assert len(calls) == 14 * 3
    calls.clear()
    for _ in range(2):                                               # two more micro-batches: cached
        q(input_ids=ids, labels=ids).loss.backward()
    assert len(calls) == 14 * 2 * 2
    opt.step()
    calls.clear()
    cached = [layer.weight_norm(torch.float32) for layer in layers(q).values()]
    assert len(calls) == 14
    assert all(torch.equal(a, b) for a, b in zip(cached, fresh_norms(q)))
    calls.clear()
    q(input_ids=ids, labels=ids).loss.backward()
    assert len(calls) == 14 * 2


def test_dora_cache_follows_a_load_and_a_merge(tmp_path):
    """load_adapter copies A into a layer that computed its terms with its initial A; merge changes W0."""
    q, plain = patch_both("dora")
    path = str(tmp_path / "a.safetensors")
    idlora.save_adapter(q, path)
    fresh = tiny()
    nf4.quantize(fresh)
    baselines.load_adapter(fresh, path)
    ids = batch()
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, q(ids).logits)
    layer = layers(plain)["model.layers.1.mlp.down_proj"]
    before = layer.weight_norm(torch.float32)
    layer.merge()                                                    # W0 <- m (W0 + s B A) / n, in place
    after = layer.weight_norm(torch.float32)
    assert not torch.equal(after, before) and torch.equal(after, fresh_norms(plain)[-1])


def test_idlora_py_stands_alone():
    """idlora.py reads 4-bit layers by duck typing: importing it imports neither nf4.py nor bitsandbytes."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = "import sys, idlora; print(sorted(m for m in ('nf4', 'baselines', 'bitsandbytes', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# -----------------------------------------------------------------------------
# Layers this project cannot read


def test_an_unknown_quantized_layer_is_one_clear_error():
    class QuantLinear(nn.Module):                                    # e.g. a GPTQ layer: no dense weight to read
        def forward(self, x):
            return x

    model = tiny()
    model.model.layers[0].self_attn.q_proj = QuantLinear()
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.q_proj is a .*QuantLinear, which cannot be adapted "
                                         r"here: load the model in full precision \(pass --quantize nf4"):
        idlora.apply_lora(model, r=4)
    int8 = tiny()
    int8.model.layers[0].mlp.up_proj.weight = nn.Parameter(torch.zeros(128, 64, dtype=torch.int8), requires_grad=False)
    with pytest.raises(ValueError, match=r"up_proj is a torch.nn.modules.linear.Linear, which cannot be adapted"):
        nf4.quantize(int8)


# -----------------------------------------------------------------------------
# GPT-2's Conv1D: weight (d_in, d_out)


@pytest.mark.parametrize("method", list(METHODS))
def test_a_conv1d_layer_is_read_as_its_transposed_linear(method):
    """Each method on a Conv1D equals it on an nn.Linear holding the transposed weight (same adapter
    tensors): outputs and gradients. PMRC's rows are the Conv1D's columns."""
    from transformers.pytorch_utils import Conv1D
    torch.manual_seed(0)
    conv = Conv1D(192, 64)                                           # nf = d_out 192, nx = d_in 64
    nn.init.normal_(conv.weight, std=0.02)
    nn.init.normal_(conv.bias, std=0.02)
    lin = nn.Linear(64, 192)
    with torch.no_grad():
        lin.weight.copy_(conv.weight.T)
        lin.bias.copy_(conv.bias)
    assert idlora.weight_shape(conv) == (192, 64) and torch.equal(idlora.dense_weight(conv), lin.weight)
    settings = dict(r=8, alpha=16.0, dropout=0.0, k=4, boost=2, selection="cluster", seed=0, ranks={"x": 8},
                    targets=["x"])
    made = []
    for base in (conv, lin):
        saved = {"idx": idlora.cluster_rows(idlora.dense_weight(base), 4, 8)} if method == "idlora" else {}
        made.append(METHODS[method].make(base.requires_grad_(False), settings, 8, saved))
    a, b = made
    with torch.no_grad():
        for (n, s), (_, t) in zip(idlora.adapter_tensors(a).items(), idlora.adapter_tensors(b).items()):
            if n != "m":
                s.copy_(torch.randn_like(s) if s.is_floating_point() else s)
                t.copy_(s)
    x = torch.randn(3, 64)
    ya, yb = a(x), b(x)
    ya.sum().backward()
    yb.sum().backward()
    torch.testing.assert_close(ya, yb, atol=1e-5, rtol=1e-6)
    for (n, s), (_, t) in zip(a.named_parameters(), b.named_parameters()):
        if s.requires_grad:
            torch.testing.assert_close(s.grad, t.grad, atol=1e-5, rtol=1e-6, msg=n)


@pytest.mark.parametrize("method", list(METHODS))
def test_gpt2_every_method_patches_trains_saves_and_loads(tmp_path, method):
    ids = batch()
    base = gpt2()
    with torch.no_grad():
        before = base(ids).logits
    with pytest.raises(ValueError, match=r"match no linear layer in the model; its linear layers are named "
                                         r"\['c_attn', 'c_fc', 'c_proj', 'lm_head'\]"):
        baselines.apply(gpt2(), method)                              # LLaMA's names: the error gives GPT-2's
    model = gpt2()
    baselines.apply(model, method, targets=GPT2, dropout=0.0, selection="cluster", **SMALL[method])
    assert len(model.adapter_config["ranks"]) == 8
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)                # the base exactly at init
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(layer.B.grad.abs().sum() > 0 for layer in layers(model).values())    # gradients reach every B
    model.eval()
    perturb(model)
    path = str(tmp_path / "adapter.safetensors")
    idlora.save_adapter(model, path)
    fresh = gpt2()
    baselines.load_adapter(fresh, path)
    with torch.no_grad():
        want = model(ids).logits
        assert torch.equal(fresh(ids).logits, want)
        if baselines.mergeable(method):
            for layer in layers(fresh).values():
                layer.merge()
            torch.testing.assert_close(fresh(ids).logits, want, atol=1e-5, rtol=0)
            assert isinstance(fresh.transformer.h[0].attn.c_attn.base.weight, nn.Parameter)


def test_gpt2_on_a_4bit_base():
    base = gpt2()
    nf4.quantize(base, GPT2)
    assert type(base.transformer.h[1].mlp.c_fc).__name__ == "NF4Linear" and base.transformer.h[1].mlp.c_fc.bias is not None
    model = copy.deepcopy(base)
    idlora.apply_idlora(model, r=16, k=4, targets=GPT2)
    ids = batch()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base(ids).logits)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(layer.B.grad.abs().sum() > 0 for layer in layers(model).values())


# -----------------------------------------------------------------------------
# A model loaded in 4-bit by transformers with bitsandbytes (where bitsandbytes is installed)


def test_the_codes_are_bitsandbytes():
    """The same 4-bit codes as bitsandbytes' NF4 (blocks of 64), and values within its absmax coding."""
    bnbf = pytest.importorskip("bitsandbytes.functional")
    torch.manual_seed(0)
    w = (torch.randn(256, 512) * 0.02).to(torch.bfloat16)
    packed, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    ours = nf4.NF4Linear(w)
    assert torch.equal(unpack(ours.codes), unpack(packed.reshape(-1, 32)))
    diff = (ours.dequantize(torch.float32) - bnbf.dequantize_4bit(packed, state).float()).abs().max()
    assert 0 < diff < 1e-3


def test_a_bitsandbytes_4bit_model_patches(tmp_path):
    bnb = pytest.importorskip("bitsandbytes")
    from bitsandbytes.functional import dequantize_4bit
    from transformers import BitsAndBytesConfig
    tiny().save_pretrained(tmp_path / "tiny")
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.float32)

    def load():
        return AutoModelForCausalLM.from_pretrained(tmp_path / "tiny", quantization_config=q, device_map="cpu").eval()

    ids = batch()
    for method in METHODS:
        base = load()
        lin = base.model.layers[0].self_attn.q_proj
        w = dequantize_4bit(lin.weight.data, lin.weight.quant_state)
        assert isinstance(lin, bnb.nn.Linear4bit) and idlora.weight_shape(lin) == (64, 64)
        assert torch.equal(idlora.dense_weight(lin), w)
        base.train()                              # train mode: bitsandbytes dequantizes, then multiplies
        with torch.no_grad():
            before = base(ids).logits
        baselines.apply(base, method, dropout=0.0, selection="serial", **SMALL[method])
        assert base.adapter_config["quantize"] == "bitsandbytes-nf4"
        with torch.no_grad():
            assert torch.equal(base(ids).logits, before)
        # a validation pass (eval, no grad), then training: the 4-bit layers still pass gradients on
        perturb(base)
        base.eval()
        with torch.no_grad():
            base(ids)
        base.train()
        base(input_ids=ids, labels=ids).loss.backward()
        first = layers(base)["model.layers.0.self_attn.q_proj"]
        assert first.B.grad is not None and first.B.grad.abs().sum() > 0, method
        x = torch.randn(3, 64, requires_grad=True)
        first.base(x).sum().backward()
        torch.testing.assert_close(x.grad, w.sum(0).expand(3, -1), atol=1e-5, rtol=0)
        path = str(tmp_path / f"{method}.safetensors")
        idlora.save_adapter(base, path)
        fresh = load()
        baselines.load_adapter(fresh, path)
        fresh.train()
        with torch.no_grad():
            assert torch.equal(fresh(ids).logits, base(ids).logits), method
    # An eval pass before patching repacks the weights on an AVX512-BF16 CPU: patching undoes it (the
    # absmaxes coded again: within 2%), and the layer trains.
    base = load()
    lin = base.model.layers[1].mlp.down_proj
    w = dequantize_4bit(lin.weight.data, lin.weight.quant_state)
    with torch.no_grad():
        base(ids)
    assert lin.weight.quant_state.packing_format_for_cpu == bnb.functional.has_avx512bf16()
    baselines.apply(base, "dora", r=4)                                # DoRA reads the rows at init
    assert not lin.weight.quant_state.packing_format_for_cpu
    torch.testing.assert_close(idlora.dense_weight(lin), w, atol=0, rtol=0.02)
    x = torch.randn(3, 128, requires_grad=True)
    base.train()
    lin(x).sum().backward()
    torch.testing.assert_close(x.grad, idlora.dense_weight(lin).sum(0).expand(3, -1), atol=1e-5, rtol=0)
