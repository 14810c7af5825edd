"""generate's per-token outputs and controls against transformers' generate: output_scores and
output_logits (one [B, V] row per new token, on every strategy), stopping_criteria asked after
every new token, and a generation_config passed in."""

from __future__ import annotations

import pytest
import torch
from test_generate import PAD, prompts, tiny

transformers = pytest.importorskip("transformers")

import fastdecode  # noqa: E402

STRATEGIES = {
    "greedy": dict(strategy="greedy"),
    "jacobi": dict(strategy="jacobi", window=3, ngram=3, guesses=3),
    "trie": dict(strategy="trie"),
}


class StopAfter(transformers.StoppingCriteria):
    """Done once the row's last token is ``token``."""

    def __init__(self, token: int) -> None:
        self.token = token

    def __call__(self, input_ids, scores, **kwargs):
        return input_ids[:, -1] == self.token


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_scores_and_logits_equal_transformers(kind):
    model = tiny(kind, seed=7, hidden=64)
    ids, mask = prompts(2, 15, seed=3, pad_rows={0: 4})
    want = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=14,
                          eos_token_id=None, pad_token_id=PAD, repetition_penalty=1.2,
                          output_scores=True, output_logits=True, return_dict_in_generate=True)
    for name, kwargs in STRATEGIES.items():
        out = fastdecode.generate(model, ids, attention_mask=mask, max_new_tokens=14,
                                  eos_token_id=[], repetition_penalty=1.2, output_scores=True,
                                  output_logits=True, return_dict_in_generate=True, **kwargs)
        assert torch.equal(out.sequences, want.sequences), name
        assert len(out.scores) == len(out.logits) == len(want.scores) == 14
        for got, exp in zip(out.scores + out.logits, want.scores + want.logits):
            assert got.shape == exp.shape and got.dtype == torch.float32
            torch.testing.assert_close(got, exp, atol=1e-4, rtol=1e-4, msg=name)


def test_sampled_scores_are_the_warped_distribution():
    model = tiny("llama", seed=8, hidden=64)
    ids, mask = prompts(2, 12, seed=4)
    out = fastdecode.generate(model, ids, attention_mask=mask, max_new_tokens=10, eos_token_id=[],
                              strategy="jacobi", do_sample=True, top_k=5, output_scores=True,
                              generator=torch.Generator().manual_seed(0))
    assert out.logits is None and len(out.scores) == 10
    for i, column in enumerate(out.scores):
        assert (torch.isfinite(column).sum(-1) == 5).all()  # top_k=5 kept five tokens
        chosen = out.sequences[:, 12 + i]
        assert torch.isfinite(column.gather(1, chosen[:, None])).all()


def test_finished_rows_hold_zero_scores():
    model = tiny("llama", seed=1)
    ids, mask = prompts(2, 9, seed=3)
    plain = fastdecode.generate(model, ids, attention_mask=mask, max_new_tokens=12,
                                eos_token_id=[]).sequences
    eos = int(plain[0, 11])  # row 0 ends after 3 new tokens
    out = fastdecode.generate(model, ids, attention_mask=mask, max_new_tokens=12,
                              eos_token_id=eos, output_logits=True)
    if (out.sequences[1, 9:] == eos).any():
        pytest.skip("row 1 emitted the same token")
    assert len(out.logits) == 12
    assert all((column[0] == 0).all() for column in out.logits[3:])
    assert all((column[1] != 0).any() for column in out.logits)


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_stopping_criteria_end_rows_as_in_transformers(name):
    model = tiny("llama", seed=5, hidden=64)
    ids, mask = prompts(2, 15, seed=6, pad_rows={1: 3})
    plain = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=24,
                           eos_token_id=None, pad_token_id=PAD)
    token = int(plain[0, 15 + 5])  # row 0's sixth new token
    # transformers pads a stopped row only when an EOS token is set: one that never comes
    eos = next(t for t in range(4, 48) if t not in plain)
    criteria = transformers.StoppingCriteriaList([StopAfter(token),
                                                  transformers.MaxLengthCriteria(15 + 20)])
    want = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=24,
                          eos_token_id=eos, pad_token_id=PAD, stopping_criteria=criteria)
    out = fastdecode.generate(model, ids, attention_mask=mask, max_new_tokens=24,
                              eos_token_id=eos, pad_token_id=PAD, stopping_criteria=criteria,
                              **STRATEGIES[name])
    assert torch.equal(out.sequences, want)
    assert out.sequences.shape[1] == 15 + 20 and (out.sequences[0, 21:] == PAD).all()


def test_generation_config_argument():
    model = tiny("gpt2", seed=2, hidden=64)
    ids, mask = prompts(2, 10, seed=8, pad_rows={0: 2})
    config = transformers.GenerationConfig(max_new_tokens=9, repetition_penalty=1.5,
                                           pad_token_id=PAD, eos_token_id=None)
    want = model.generate(ids, attention_mask=mask, generation_config=config)
    out = fastdecode.generate(model, ids, attention_mask=mask, generation_config=config,
                              eos_token_id=[], strategy="jacobi", window=2, ngram=3, guesses=2)
    assert torch.equal(out.sequences, want)


def test_bad_controls_raise_clearly():
    model = tiny("llama")
    ids = torch.full((1, 6), 5, dtype=torch.int64)
    with pytest.raises(TypeError, match="generation_config must be a transformers "
                                        "GenerationConfig, found dict"):
        fastdecode.generate(model, ids, max_new_tokens=3, generation_config={"max_length": 9})
    with pytest.raises(TypeError, match="stopping_criteria must hold callables .* found int"):
        fastdecode.generate(model, ids, max_new_tokens=3, stopping_criteria=[3])


@pytest.mark.parametrize("name", ["greedy", "jacobi", "trie"])
def test_past_key_values_continue_a_conversation(name):
    """Turn 2 passes turn 1's past_key_values with turn 1's sequences plus new tokens: only the
    new tokens are encoded, and the output equals a fresh call's and transformers'."""
    from fastdecode.decoding import TrieCache

    model = tiny("llama", seed=9, hidden=64)
    trie = TrieCache(model.config.vocab_size) if name == "trie" else None
    extra = dict(trie_cache=trie) if trie is not None else {}
    turn1 = prompts(1, 12, seed=1)[0]
    out1 = fastdecode.generate(model, turn1, max_new_tokens=10, eos_token_id=[],
                               **STRATEGIES[name], **extra)
    cache = out1.past_key_values
    assert cache.get_seq_length() == out1.sequences.shape[1] - 1
    turn2 = torch.cat([out1.sequences, torch.tensor([[7, 8, 9, 7, 8]])], dim=1)
    fed = []
    hook = model.get_input_embeddings().register_forward_hook(
        lambda module, args, out: fed.append(args[0].shape[1]))
    try:
        out2 = fastdecode.generate(model, turn2, max_new_tokens=10, eos_token_id=[],
                                   past_key_values=cache, **STRATEGIES[name], **extra)
    finally:
        hook.remove()
    assert fed[0] == 6  # turn 1's last token and the five new ones
    fresh = fastdecode.generate(model, turn2, max_new_tokens=10, eos_token_id=[])
    want = model.generate(turn2, do_sample=False, max_new_tokens=10, eos_token_id=None,
                          pad_token_id=PAD)
    assert torch.equal(out2.sequences, fresh.sequences) and torch.equal(out2.sequences, want)
    assert out2.past_key_values is cache
    assert cache.get_seq_length() == out2.sequences.shape[1] - 1


def test_bad_past_key_values_raise_clearly():
    model = tiny("llama", seed=9, hidden=64)
    ids = prompts(1, 8, seed=1)[0]
    out = fastdecode.generate(model, ids, max_new_tokens=4, eos_token_id=[])
    cache = out.past_key_values
    held = cache.get_seq_length()
    with pytest.raises(TypeError, match="past_key_values must be a transformers Cache"):
        fastdecode.generate(model, ids, max_new_tokens=2, past_key_values=(1, 2))
    with pytest.raises(ValueError, match=f"past_key_values holds {held} tokens; input_ids must "
                                         f"extend them with at least one more, found 8"):
        fastdecode.generate(model, ids, max_new_tokens=2, past_key_values=cache)
    with pytest.raises(ValueError, match=r"continues one unpadded row; found input_ids of "
                                         r"shape \(2, 12\)"):
        fastdecode.generate(model, out.sequences.repeat(2, 1).contiguous(), max_new_tokens=2,
                            past_key_values=cache)
    assert cache.get_seq_length() == held  # rejected calls leave it as it was
    sliding = transformers.DynamicCache(config=transformers.MistralConfig(
        sliding_window=4, num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
        num_key_value_heads=2))
    sliding.update(torch.zeros(1, 2, 3, 16), torch.zeros(1, 2, 3, 16), 0)
    with pytest.raises(ValueError, match="past_key_values has sliding-window layers"):
        fastdecode.generate(model, out.sequences, max_new_tokens=2, past_key_values=sliding)


def test_sampling_settings_default_as_in_transformers():
    """do_sample and the warpers come from the generation config, else transformers'
    defaults: sampling keeps the 50 most likely tokens unless told otherwise."""
    model = tiny("llama", seed=3, hidden=64, vocab=256)
    ids = torch.full((1, 6), 5, dtype=torch.int64)

    def run(**kw):
        return fastdecode.generate(model, ids, max_new_tokens=4, eos_token_id=[],
                                   output_scores=True, generator=torch.Generator().manual_seed(0),
                                   **kw)

    sampled = run(do_sample=True)
    assert all((torch.isfinite(c).sum(-1) == 50).all() for c in sampled.scores)
    assert all((torch.isfinite(c).sum(-1) == 256).all() for c in run(do_sample=True, top_k=0).scores)
    saved = model.generation_config.do_sample, model.generation_config.top_k
    try:
        model.generation_config.do_sample, model.generation_config.top_k = True, 1
        out = run()  # samples, from one token: greedy's output
        assert all((torch.isfinite(c).sum(-1) == 1).all() for c in out.scores)
        assert torch.equal(out.sequences, run(do_sample=False).sequences)
    finally:
        model.generation_config.do_sample, model.generation_config.top_k = saved
