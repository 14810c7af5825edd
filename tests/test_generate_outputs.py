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
