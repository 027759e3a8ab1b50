"""Shared pytest fixtures: the embedded model (skipped with the reason when its package is
absent), one PMRC row cache per test session (the embedded model is clustered once), and a
tiny random LLaMA saved as a local model folder; and a data dir of 16 GSM8K-style records. Also two
helpers the method tests share: an adapted model's layers, and non-zero adapter tensors."""

import json
import os

import pytest
import torch


@pytest.fixture(scope="session")
def row_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("rows"))


@pytest.fixture
def embedded():
    """A fresh copy of the embedded SmolLM2-135M-Instruct: (model, tokenizer)."""
    import train
    try:
        train.embedded_gguf()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    return train.load_model()


@pytest.fixture(scope="session")
def tok():
    """The embedded model's tokenizer (from its converted cache)."""
    import train
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(train.embedded_model_dir())


def save_tiny_llama(out, tok, tie=True, lm_head_scale=1.0):
    """Save a tiny random LLaMA (vocabulary = `tok`'s) with `tok` as a local model folder."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(lm_head_scale)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tok):
    """A tiny random LLaMA with the embedded tokenizer, saved like any local model folder."""
    return save_tiny_llama(str(tmp_path_factory.mktemp("tiny-llama")), tok)


@pytest.fixture(scope="session")
def gsm8k_dir(tmp_path_factory):
    """A data dir with 16 short GSM8K-style records (the same few, so a tiny model can fit them)."""
    root = tmp_path_factory.mktemp("data")
    os.makedirs(root / "gsm8k")
    with open(root / "gsm8k" / "train.jsonl", "w") as f:
        for i in range(16):
            f.write(json.dumps({"question": f"What is {i} plus {i}?", "answer": f"{i} + {i} = {2 * i}\n#### {2 * i}"}) + "\n")
    return str(root)


def layers(model):
    """{name: adapted layer} of a model patched by apply_idlora, apply_lora or baselines.apply."""
    return {name: model.get_submodule(name) for name in model.adapter_config["ranks"]}


@torch.no_grad()
def perturb(model, seed=1):
    """Non-zero adapter tensors (B starts at 0, which hides most mistakes): every float tensor moved."""
    import idlora
    g = torch.Generator().manual_seed(seed)
    for layer in layers(model).values():
        for name, t in idlora.adapter_tensors(layer).items():
            if t.is_floating_point():
                t.add_(0.2 * torch.randn(t.shape, generator=g).to(t.dtype) * (t.abs().mean() if name == "m" else 1))
