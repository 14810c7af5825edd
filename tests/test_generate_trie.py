"""strategy="trie" and "prompt_lookup": greedy output identical to transformers' generate on
tiny Llama and GPT-2 models (batch > 1, uneven prompts, EOS), a kept TrieCache warming up over a
repeated workload, and bad arguments."""

from __future__ import annotations

import pytest
import torch
from conftest import flat_forward_costs
from test_generate import hf_greedy, prompts, tiny

import fastdecode
from fastdecode.decoding import TrieCache
from fastdecode.hf import use_cpu_linears


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("strategy,kwargs", [
    ("trie", {}), ("trie", dict(decoding_length=5, branch_length=2)),
    ("trie", dict(decoding_length=1, branch_length=0)), ("trie", dict(decoding_length=40, branch_length=12)),
    ("prompt_lookup", {}), ("prompt_lookup", dict(branch_length=3)),
])
def test_greedy_matches_transformers(kind, strategy, kwargs):
    model = tiny(kind)
    ids, mask = prompts(3, 20, seed=5, pad_rows={1: 6, 2: 11})
    out = fastdecode.generate(model, ids, attention_mask=mask, strategy=strategy,
                              max_new_tokens=40, eos_token_id=[], **kwargs)
    assert torch.equal(out.sequences, hf_greedy(model, ids, mask, 40, eos=None))


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("kwargs", [{}, dict(decoding_length=5, branch_length=3),
                                    dict(decoding_length=1)])
def test_auto_greedy_matches_transformers(kind, kwargs):
    model = tiny(kind)
    ids, mask = prompts(3, 20, seed=5, pad_rows={1: 6, 2: 11})
    out = fastdecode.generate(model, ids, attention_mask=mask, strategy="trie", config="auto",
                              max_new_tokens=40, eos_token_id=[], **kwargs)
    assert torch.equal(out.sequences, hf_greedy(model, ids, mask, 40, eos=None))
    auto = out.stats.drafter["auto"]
    assert sum(auto["choices"].values()) == out.stats.steps - 1  # the prefill is a step
    budget = kwargs.get("decoding_length", 64)
    assert all(1 <= int(c.split("=")[1]) <= budget for c in auto["choices"])


def test_auto_drafts_where_it_pays():
    """With forwards of any size costing the same (as on a memory-bound GPU), a repeated
    workload's kept trie makes "auto" draft big trees and take few steps."""
    model = tiny("llama")
    ids, _ = prompts(1, 20, seed=5)
    cache = TrieCache(model.config.vocab_size)
    fastdecode.generate(model, ids, strategy="trie", max_new_tokens=40, eos_token_id=[],
                        trie_cache=cache)
    with flat_forward_costs(model):
        out = fastdecode.generate(model, ids, strategy="trie", config="auto", max_new_tokens=40,
                                  eos_token_id=[], trie_cache=cache)
    assert torch.equal(out.sequences, hf_greedy(model, ids, torch.ones_like(ids), 40, eos=None))
    assert out.stats.steps <= 12
    assert max(int(c.split("=")[1]) for c in out.stats.drafter["auto"]["choices"]) > 1


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_eos_inside_an_accepted_branch(kind):
    model = tiny(kind, seed=1)
    ids, mask = prompts(2, 21, seed=9, pad_rows={1: 7})
    plain = hf_greedy(model, ids, mask, 50, eos=None)
    for cut in (4, 17):
        eos = int(plain[0, 21 + cut])
        out = fastdecode.generate(model, ids, attention_mask=mask, strategy="trie",
                                  max_new_tokens=50, eos_token_id=eos)
        assert torch.equal(out.sequences, hf_greedy(model, ids, mask, 50, eos=eos))


def test_kept_cache_warms_up_a_repeated_workload():
    model = tiny("llama")
    ids, _ = prompts(1, 20, seed=5)
    cache = TrieCache(model.config.vocab_size)
    steps = []
    for _ in range(2):
        out = fastdecode.generate(model, ids, strategy="trie", max_new_tokens=40, eos_token_id=[],
                                  trie_cache=cache)
        assert torch.equal(out.sequences, hf_greedy(model, ids, torch.ones_like(ids), 40, eos=None))
        steps.append(out.stats.steps)
    assert steps[1] < steps[0]


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(decoding_length=0), ValueError, "decoding_length must be >= 1, found 0"),
    (dict(branch_length=-1), ValueError, "branch_length must be >= 0, found -1"),
    (dict(decoding_length=2.5), TypeError, "decoding_length must be an int"),
    (dict(trie_cache="trie"), TypeError, "cache must be a TrieCache, found str"),
    (dict(trie_cache=TrieCache(7)), ValueError, "cache has vocab_size 7 but the model has 48"),
    (dict(config="auto", decoding_length=0), ValueError, "decoding_length must be >= 1"),
    (dict(strategy="prompt_lookup", config="auto"), ValueError,
     "config='auto' applies to strategy 'jacobi' or 'trie', found 'prompt_lookup'"),
])
def test_bad_arguments(kwargs, exc, match):
    model = tiny("llama")
    kwargs = {"strategy": "trie", **kwargs}
    with pytest.raises(exc, match=match):
        fastdecode.generate(model, torch.full((1, 6), 5, dtype=torch.int64), max_new_tokens=5,
                            **kwargs)


def test_token_out_of_vocabulary_is_rejected():
    model = tiny("llama")
    with pytest.raises(ValueError, match="input_ids holds token ids outside"):
        fastdecode.generate(model, torch.full((1, 6), 48, dtype=torch.int64), strategy="trie",
                            max_new_tokens=5)


@pytest.mark.parametrize("strategy,kwargs", [
    ("trie", {}), ("trie", {"config": "auto"}), ("prompt_lookup", {}), ("jacobi", {}),
])
def test_greedy_exact_on_fastdecode_cpu_linears(strategy, kwargs):
    """With the model's linears on fastdecode's CPU kernel (use_cpu_linears), every strategy
    reproduces transformers' greedy decoding on those same kernels, batch and padding
    included."""
    model = tiny("llama")
    ids, mask = prompts(3, 20, seed=5, pad_rows={1: 6, 2: 11})
    with use_cpu_linears(model), flat_forward_costs(model):
        want = hf_greedy(model, ids, mask, 40, eos=None)
        out = fastdecode.generate(model, ids, attention_mask=mask, strategy=strategy,
                                  max_new_tokens=40, eos_token_id=[], **kwargs)
    assert torch.equal(out.sequences, want)
    assert out.stats.steps < 40  # drafts were accepted
