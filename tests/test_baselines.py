"""Tests of baselines.py: all 25 numbers of the paper's Table 6, our LoRA and DoRA against peft's
(outputs and gradients; DoRA in float32 and float64), merged DoRA, HydraLoRA and MoELoRA against
their formulas, their dropout (one mask per head or expert in training, the shared single path in
eval and at p = 0), and for every method of the table: the base model at init, gradients only in
adapter tensors, the file's contents, save -> load, the precision convention, clear errors, and one
graph for torch.compile.

    pytest tests/test_baselines.py        (CPU only; peft is needed for the two peft tests)
"""

import argparse
import copy
import inspect
import runpy

import pytest
import torch
import torch.nn as nn
from transformers import AutoModelForCausalLM, LlamaConfig

import baselines
import idlora
from conftest import layers, perturb
from baselines import METHODS, DoRALinear, HydraLoRALinear, MoELoRALinear

# Spec section 3: LLaMA-3-8B, all seven projections; HydraLoRA 3 heads, MoELoRA 4 experts, ID-LoRA k=4, m=2.
TABLE6 = {
    8: dict(lora=20_971_520, dora=22_347_776, hydralora=46_727_168, moelora=88_866_816, idlora=7_733_248),
    16: dict(lora=41_943_040, dora=43_319_296, hydralora=89_718_784, moelora=172_752_896, idlora=10_485_760),
    32: dict(lora=83_886_080, dora=85_262_336, hydralora=175_702_016, moelora=340_525_056, idlora=15_990_784),
    64: dict(lora=167_772_160, dora=169_148_416, hydralora=347_668_480, moelora=676_069_376, idlora=27_000_832),
    128: dict(lora=335_544_320, dora=336_920_576, hydralora=691_601_408, moelora=1_347_158_016, idlora=49_020_928),
}

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
# Small settings for the tiny model (ID-LoRA's k*r must fit the 32-row k/v projections).
SMALL = dict(idlora=dict(r=8, k=4), lora=dict(r=4), dora=dict(r=4), hydralora=dict(r=4, k=3), moelora=dict(r=4, k=4))


def tiny(dtype=torch.float32, **kw):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(LlamaConfig(**(TINY | kw))).to(dtype).eval()


def batch(seed=0, n=2, t=12):
    return torch.randint(0, TINY["vocab_size"], (n, t), generator=torch.Generator().manual_seed(seed))


def patched(method, dtype=torch.float32, dropout=0.0, **kw):
    model = tiny(dtype, **kw)
    baselines.apply(model, method, dropout=dropout, selection="random", **SMALL[method])
    return model


# -----------------------------------------------------------------------------
# Table 6 and the table itself


def test_table6_all_25_numbers_on_llama3_8b_meta(capsys):
    """`python baselines.py` prints the five columns, counted by parameter_table on the meta model."""
    runpy.run_module("baselines", run_name="__main__")
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == "| rank | lora | dora | hydralora (k=3) | moelora (k=4) | idlora (k=4, boost=2) |"
    for r, row in TABLE6.items():
        line = next(l for l in lines if l.startswith(f"| {r} | "))
        assert [cell.split(" (")[0] for cell in line.strip("| ").split(" | ")[1:]] == [f"{row[m]:,}" for m in row]


def test_table_defaults_are_the_paper_settings_and_the_apply_functions_defaults():
    assert {m: e.defaults for m, e in METHODS.items()} == dict(
        idlora=dict(r=128, k=4, boost=2, selection="cluster"), lora=dict(r=32), dora=dict(r=32),
        hydralora=dict(r=16, k=3), moelora=dict(r=8, k=4))
    for method, entry in METHODS.items():
        params = inspect.signature(entry.apply).parameters
        assert {k: params[k].default for k in entry.defaults} == entry.defaults, method
        assert params["alpha"].default == 2 * entry.defaults["r"] and params["dropout"].default == 0.05
    assert [m for m in METHODS if baselines.mergeable(m)] == ["lora", "dora"]


# -----------------------------------------------------------------------------
# Every method: init, gradients, the file, save -> load


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("method", list(METHODS))
def test_init_is_the_base_model_exactly(method, dtype):
    ids = batch()
    with torch.no_grad():
        before = tiny(dtype)(ids).logits
        model = patched(method, dtype)
        assert torch.equal(model(ids).logits, before)


@pytest.mark.parametrize("method", list(METHODS))
def test_only_adapter_tensors_train_and_the_count_is_the_formula(method):
    model = patched(method, dropout=0.1)
    perturb(model)
    model.train()
    ids = batch()
    model(input_ids=ids, labels=ids).loss.backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None}
    want = {f"{name}.{t}" for name, layer in layers(model).items() for t, v in idlora.adapter_tensors(layer).items()
            if v.is_floating_point()}
    assert got == want and all(model.get_parameter(n).grad.abs().sum() > 0 for n in got)
    per_layer = sum(METHODS[method].nbytes(*layer.base.weight.shape, layer) for layer in layers(model).values())
    stored = sum(v.numel() * v.element_size() for layer in layers(model).values()
                 for v in idlora.adapter_tensors(layer).values())
    assert per_layer == stored                                       # the spec's formula, in bytes


@pytest.mark.parametrize("method", list(METHODS))
def test_save_load_gives_the_same_logits(tmp_path, monkeypatch, method):
    ids = batch()
    model = patched(method)
    perturb(model)
    with torch.no_grad():
        want = model(ids).logits
    path = str(tmp_path / "adapter.safetensors")
    idlora.save_adapter(model, path)
    from safetensors.torch import load_file
    saved = load_file(path)
    assert saved.keys() == {f"{n}.{t}" for n, layer in layers(model).items() for t in idlora.adapter_tensors(layer)}
    assert {v.dtype for v in saved.values()} <= {torch.float32, torch.int64}
    monkeypatch.setattr(idlora, "cluster_rows", None)                # loading never clusters
    fresh = tiny()
    rep = baselines.load_adapter(fresh, path)
    assert rep["method"] == method and rep["trainable"] == idlora.count_trainable(model)
    assert type(layers(fresh)["model.layers.0.mlp.down_proj"]) is METHODS[method].layer
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, want)


def test_loading_errors_are_clear(tmp_path):
    model = patched("hydralora")
    path = str(tmp_path / "a.safetensors")
    idlora.save_adapter(model, path)
    with pytest.raises(ValueError, match=r"q_proj: adapter shapes .* do not fit this model's layer of shape \(128, 128\)"):
        baselines.load_adapter(tiny(hidden_size=128, intermediate_size=256), path)
    with pytest.raises(ValueError, match=r"holds a 'hydralora' adapter; this loader knows \['idlora', 'lora'\]"):
        idlora.load_adapter(tiny(), path)                            # idlora.py alone knows its own two


# -----------------------------------------------------------------------------
# LoRA and DoRA against peft (the reference implementation people trust)


def with_peft(method, dropout, dtype=torch.float32):
    """(ours, peft's) on the same tiny LLaMA with the same A, B (and m), none of them zero."""
    peft = pytest.importorskip("peft")
    base = tiny(dtype)
    ours = copy.deepcopy(base)
    baselines.apply(ours, method, r=4, dropout=dropout)
    perturb(ours)
    ref = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=dropout, target_modules=list(idlora.TARGETS), use_dora=method == "dora"))
    theirs = dict(ref.base_model.model.named_modules())
    pairs = []                                                       # (our tensor, peft's)
    for name, layer in layers(ours).items():
        p = theirs[name]
        pairs += [(layer.A, p.lora_A["default"].weight), (layer.B, p.lora_B["default"].weight)]
        if method == "dora":
            pairs.append((layer.m, p.lora_magnitude_vector["default"].weight))
    with torch.no_grad():
        for a, b in pairs:
            b.copy_(a)
    return ours, ref, pairs


@pytest.mark.parametrize("method,dtype,tol", [("lora", torch.float32, 1e-5), ("dora", torch.float32, 1e-5),
                                               ("dora", torch.float64, 1e-10)])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_lora_and_dora_equal_peft_outputs_and_gradients(method, dtype, tol, dropout):
    """Same logits and the same gradient of every A, B (and m) as peft 0.21's LoRA/DoRA, within 1e-5
    in float32; DoRA in float64 (its tensors then float64, as peft's) within 1e-10. With dropout
    (training mode) both draw the same mask from the same seed: DoRA's dropout path (the frozen
    W0 x' recomputed on the dropped input) is peft's too."""
    ours, ref, pairs = with_peft(method, dropout, dtype)
    assert {x.dtype for x, _ in pairs} == {y.dtype for _, y in pairs} == {dtype}
    ids = batch()
    ours.train(dropout > 0)
    ref.train(dropout > 0)
    torch.manual_seed(5)
    a = ours(input_ids=ids, labels=ids)
    torch.manual_seed(5)
    b = ref(input_ids=ids, labels=ids)
    assert a.logits.dtype == dtype
    torch.testing.assert_close(a.logits, b.logits, atol=tol, rtol=0)
    a.loss.backward()
    b.loss.backward()
    assert all(x.grad.abs().sum() > 0 for x, _ in pairs)
    for x, y in pairs:
        torch.testing.assert_close(x.grad, y.grad, atol=tol, rtol=0)


def test_merged_dora_gives_the_logits_of_the_unmerged():
    model = patched("dora")
    perturb(model)
    ids = batch()
    with torch.no_grad():
        unmerged = model(ids).logits
        for layer in layers(model).values():
            layer.merge()
        merged = model(ids).logits
        assert all(l.merged for l in layers(model).values())
        torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=0)
        assert not torch.allclose(merged, tiny()(ids).logits, atol=1e-3)   # the update is in W0 now


# -----------------------------------------------------------------------------
# HydraLoRA and MoELoRA against their formulas, and the precision convention


def naive(layer, x):
    """The formulas, literally, in float64: w = softmax(W_g x); HydraLoRA sum_i w_i B_i A x,
    MoELoRA sum_i w_i B_i A_i x; DoRA m (W0 + s B A) x / ||W0 + s B A|| + b."""
    d = lambda t: t.detach().double()
    W0, b, x = d(layer.base.weight), layer.base.bias, x.double()
    y = x @ W0.T + (d(b) if b is not None else 0)
    if isinstance(layer, DoRALinear):
        W = W0 + layer.scaling * d(layer.B) @ d(layer.A)
        return x @ (d(layer.m)[:, None] * W / W.norm(dim=1, keepdim=True)).T + (d(b) if b is not None else 0)
    w = torch.softmax(x @ d(layer.router).T, dim=-1)
    A = [d(layer.A)] * layer.k if isinstance(layer, HydraLoRALinear) else list(d(layer.A))
    return y + layer.scaling * sum(w[:, i:i + 1] * (x @ A[i].T @ d(layer.B[i]).T) for i in range(layer.k))


@pytest.mark.parametrize("cls,kw", [(DoRALinear, {}), (HydraLoRALinear, dict(k=3)), (MoELoRALinear, dict(k=4))])
@pytest.mark.parametrize("bias", [False, True])
def test_layers_equal_their_formulas_and_fp32_is_the_same_on_float32(cls, kw, bias):
    torch.manual_seed(0)
    layer = cls(nn.Linear(48, 96, bias=bias), r=8, alpha=16, **kw).eval()
    with torch.no_grad():
        for t in (layer.B, *([layer.m] if cls is DoRALinear else [])):
            t.add_(0.3 * torch.randn_like(t) * (t.abs().mean() if t is not layer.B else 1))
    x = torch.randn(5, 48)
    got = layer(x)
    assert torch.allclose(got.double(), naive(layer, x), atol=1e-5)
    layer.fp32 = True
    assert torch.equal(layer(x), got)                    # float32 model: one computation either way


@pytest.mark.parametrize("cls,kw", [(DoRALinear, {}), (HydraLoRALinear, dict(k=3)), (MoELoRALinear, dict(k=4))])
def test_bf16_base_computes_in_bf16_with_float32_master_weights(cls, kw):
    torch.manual_seed(0)
    layer = cls(nn.Linear(48, 96).to(torch.bfloat16), r=8, alpha=16, **kw).eval()
    assert {p.dtype for n, p in layer.named_parameters(recurse=False)} == {torch.float32}
    nn.init.normal_(layer.B, std=0.3)
    x = torch.randn(5, 48).to(torch.bfloat16)
    want = naive(layer, x.float())
    low = layer(x)
    layer.fp32 = True
    high = layer(x)
    assert low.dtype == high.dtype == torch.bfloat16 and not torch.equal(low, high)
    for y in (low, high):
        assert (y.double() - want).abs().max() / want.abs().max() < 3e-2


def shared_path(layer, x):
    """The layer's output as computed before per-head dropout (commit 32d8466), op for op: one
    dropout(x) for all heads or experts, through the A's in one matmul."""
    dt = x.dtype
    h = x
    w = torch.softmax(h @ layer.router.T.to(dt), dim=-1, dtype=torch.float32).to(dt)
    if isinstance(layer, HydraLoRALinear):
        z = layer.dropout(h) @ layer.A.T.to(dt)
        u = (w.unsqueeze(-1) * z.unsqueeze(-2)).flatten(-2)
    else:
        z = layer.dropout(h) @ layer.A.flatten(0, 1).T.to(dt)
        u = (z.unflatten(-1, (layer.k, layer.r)) * w.unsqueeze(-1)).flatten(-2)
    y = layer.base(x)
    return y + (u @ baselines.head_matrix(layer.B, layer.scaling, dt).T).to(y.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cls,k", [(HydraLoRALinear, 3), (MoELoRALinear, 4)])
def test_eval_and_p0_are_the_shared_single_path_exactly(cls, k, dtype):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 48).to(dtype)
    for p, training in ((0.3, False), (0.0, True)):
        layer = cls(nn.Linear(48, 96).to(dtype), r=8, alpha=16, k=k, dropout=p).train(training)
        nn.init.normal_(layer.B)
        assert torch.equal(layer(x), shared_path(layer, x))


def update_variance(layer, x, n):
    """(mean, variance) over n dropout draws of the layer's update dy = y - W0 x, per output."""
    with torch.no_grad():
        dy = layer(x.expand(n, -1)) - layer.base(x)           # n tokens, each its own draw
    return dy.mean(0), dy.var(0)


@pytest.mark.parametrize("cls,k", [(HydraLoRALinear, 3), (MoELoRALinear, 4)])
def test_training_dropout_draws_one_mask_per_head_or_expert(cls, k, monkeypatch):
    """k equal heads (experts) and a uniform router (W_g = 0): dy = (s/k) sum_i B A x'_i. One
    mask shared by all heads would give dy's variance over draws V = p/(1-p) sum_j (s B A)_oj^2 x_j^2
    (exact); independent masks give V/k, as the authors' code. Measured over 20,000 draws in
    float64: 1/k of V within 7%; the shared mask, put back in the layer, measures 1 (so the test
    tells the two apart). The mean is the eval update (dropout keeps the expectation)."""
    torch.manual_seed(0)
    p, d_in, d_out, r, n = 0.5, 16, 8, 4, 20_000
    layer = cls(nn.Linear(d_in, d_out, bias=False).double(), r=r, alpha=2 * r, k=k, dropout=p)
    with torch.no_grad():
        layer.router.zero_()                                  # w_i = 1/k
        layer.B.copy_(torch.randn(d_out, r, dtype=torch.float64).expand(k, d_out, r))
        if cls is MoELoRALinear:
            layer.A.copy_(layer.A[0].expand(k, r, d_in))
    A0 = layer.A if cls is HydraLoRALinear else layer.A[0]
    x = torch.randn(d_in, dtype=torch.float64)
    V = (layer.scaling * layer.B[0] @ A0).detach().square() @ x.square() * p / (1 - p)      # (d_out,)
    with torch.no_grad():
        want_mean = layer.eval()(x) - layer.base(x)
    mean, var = update_variance(layer.train(), x, n)
    assert abs((var / V).mean().item() - 1 / k) < 0.07 / k, (var / V).mean()
    assert ((mean - want_mean).abs() < 5 * (var / n).sqrt()).all()
    monkeypatch.setattr(baselines, "dropped_copies", lambda dropout, h, k: dropout(h).expand(k, *h.shape))
    _, var_shared = update_variance(layer, x, n)
    assert abs((var_shared / V).mean().item() - 1) < 0.07


@pytest.mark.parametrize("method", ["dora", "hydralora", "moelora"])
def test_gradient_checkpointing_reaches_the_adapters(method):
    model = tiny()
    model.activation_checkpointing_enable({"use_reentrant": True})
    baselines.apply(model, method, **SMALL[method])
    model.train()
    ids = batch()
    model(input_ids=ids, labels=ids).loss.backward()
    assert len(layers(model)) == 14 and all(l.B.grad is not None and l.B.grad.abs().sum() > 0 for l in layers(model).values())


@pytest.mark.parametrize("method", list(METHODS))
def test_every_layer_compiles_as_one_graph(method):
    """torch.compile (train.py --compile; on a GPU, inductor's fused kernels) sees each method's layer
    whole, in training (dropout on) and in eval, bf16: no graph break, which would cut the adapter's
    small operators off from the frozen matmul and cost a return to Python each."""
    model = patched(method, torch.bfloat16, dropout=0.1)
    perturb(model)
    layer = next(iter(layers(model).values()))
    x = torch.randn(2, 5, idlora.weight_shape(layer.base)[1], dtype=torch.bfloat16)
    for train in (True, False):
        layer.train(train)
        torch._dynamo.reset()
        with torch.set_grad_enabled(train):
            e = torch._dynamo.explain(layer)(x)
        assert (e.graph_count, e.graph_break_count) == (1, 0), e.break_reasons


# -----------------------------------------------------------------------------
# bench.py reads the table too


def test_bench_configurations_come_from_the_table():
    from experiments import bench
    configs = bench.parse_configs("base,lora:16,dora,hydralora:8,moelora:8:2,idlora:match:4:1")
    assert [c.name for c in configs] == ["base", "lora:16", "dora:32", "hydralora:8:3", "moelora:8:2", "idlora:match:4:1"]
    assert dict(configs[3].settings) == dict(r=8, k=3)
    for bad in ("vera:8", "lora:16:2", "dora:x"):
        with pytest.raises(SystemExit, match="bad configuration"):
            bench.parse_configs(bad)
    model = tiny()
    ids = batch()
    with torch.no_grad():
        base = model(ids).logits
    bench.attach(model, configs[2], argparse.Namespace(dropout=0.0, targets=",".join(idlora.TARGETS), selection="random",
                                                       seed=0, cluster_cache="", n_init=1, max_iter=20, build_jobs=1,
                                                       adapter_fp32=False))
    perturb(model)
    wrappers = layers(model)
    weights = {n: w.base.weight.clone() for n, w in wrappers.items()}
    with torch.no_grad():
        unmerged = model(ids).logits
        saved = bench.merge(wrappers, model)                 # DoRA folded into W0, plain nn.Linear back
        assert all(type(model.get_submodule(n)) is nn.Linear for n in wrappers)
        torch.testing.assert_close(model(ids).logits, unmerged, atol=1e-5, rtol=0)
        bench.unmerge(wrappers, saved)
        for n, w in wrappers.items():
            bench.set_module(model, n, w)
        assert all(torch.equal(w.base.weight, weights[n]) for n, w in wrappers.items())   # W0 back, bit for bit
        assert torch.equal(model(ids).logits, unmerged) and not torch.equal(unmerged, base)
