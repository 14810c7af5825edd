"""History-dependent processors (repetition_penalty, min_new_tokens) applied per draft node along
its own path: the processed logits of every node equal transformers' processors run on that
node's explicit sequence; greedy output equals transformers' generate on every strategy; the
generation config's values are the defaults; sampling with a repetition penalty keeps the exact
distribution."""

from __future__ import annotations

import pytest
import torch
from conftest import flat_forward_costs
from test_generate import EOS, PAD, prompts, tiny
from test_families import STRATEGIES
from test_sampling import (P_THRESHOLD, PROMPT, VOCAB, chi2_pvalue, exact_probs,
                           small_vocab_model)

transformers = pytest.importorskip("transformers")

import fastdecode  # noqa: E402
from fastdecode.decoding.path_processors import PathProcessors  # noqa: E402
from fastdecode.decoding.sampling import SamplingConfig  # noqa: E402


def test_every_node_sees_its_own_sequence():
    """A hand-made tree per row (two branches, uneven depths): each node's processed logits
    against transformers' processors on the row's sequence plus the node's path."""
    from transformers.generation.logits_process import (
        MinNewTokensLengthLogitsProcessor,
        RepetitionPenaltyLogitsProcessor,
    )

    g = torch.Generator().manual_seed(0)
    B, T, V, L = 2, 6, 12, 5
    seq = torch.zeros(B, 20, dtype=torch.int64)
    seq[0, :8] = torch.tensor([0, 0, 4, 5, 6, 7, 8, 9])  # 2 pads, 3 prompt tokens, 3 produced
    seq[1, :6] = torch.tensor([1, 2, 3, 1, 2, 10])  # 5 prompt tokens, 1 produced
    start, end, produced = torch.tensor([2, 0]), torch.tensor([8, 6]), [3, 1]
    tokens = torch.tensor([[9, 1, 2, 3, 11, 1], [10, 11, 4, 4, 5, 2]])
    parents = torch.tensor([[-1, 0, 1, 2, 0, 4], [-1, 0, 1, 0, 3, 4]])
    logits = torch.randn(B, T, V, generator=g) * 3
    rules = PathProcessors(min_new_tokens=5, eos_ids=(2, 11), repetition_penalty=1.7)
    got = rules.apply(logits, seq, start, end, produced, tokens, parents)
    for b in range(B):
        for j in range(T):
            path, node = [], j
            while node > 0:
                path.append(int(tokens[b, node]))
                node = int(parents[b, node])
            ids = torch.tensor([seq[b, int(start[b]):int(end[b])].tolist() + path[::-1]])
            want = RepetitionPenaltyLogitsProcessor(1.7)(ids, logits[b, j][None].clone())
            prompt_len = int(end[b]) - int(start[b]) - produced[b]
            want = MinNewTokensLengthLogitsProcessor(prompt_len, 5, [2, 11])(ids, want)
            torch.testing.assert_close(got[b, j], want[0], msg=f"row {b} node {j}")


def test_inactive_processors_change_nothing():
    assert not PathProcessors().active
    assert not PathProcessors(min_new_tokens=4).active  # no EOS to hold back
    assert not PathProcessors(repetition_penalty=1.0).active
    with pytest.raises(ValueError, match="repetition_penalty must be None or a float > 0"):
        PathProcessors(repetition_penalty=0.0)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_greedy_with_history_processors_matches_transformers(kind):
    model = tiny(kind, seed=3, hidden=64)
    ids, mask = prompts(2, 17, seed=5, pad_rows={1: 4})
    plain = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=30,
                           eos_token_id=None, pad_token_id=PAD)
    eos = int(plain[0, 19])  # greedy would end row 0 after 3 new tokens
    for args in (dict(repetition_penalty=1.3), dict(min_new_tokens=9),
                 dict(repetition_penalty=0.8, min_new_tokens=6)):
        want = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=30,
                              eos_token_id=eos, pad_token_id=PAD, **args)
        with flat_forward_costs(model):
            for name, kwargs in STRATEGIES.items():
                out = fastdecode.generate(model, ids, attention_mask=mask, max_new_tokens=30,
                                          eos_token_id=eos, **args, **kwargs)
                assert torch.equal(out.sequences, want), f"{kind} {args} {name}"


def test_generation_config_values_are_the_defaults():
    model = tiny("llama", seed=4, hidden=64)
    ids, mask = prompts(2, 15, seed=7, pad_rows={0: 2})
    saved = model.generation_config.repetition_penalty, model.generation_config.min_new_tokens
    try:
        model.generation_config.repetition_penalty = 1.4
        model.generation_config.min_new_tokens = 5
        want = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=20,
                              eos_token_id=EOS, pad_token_id=PAD)
        out = fastdecode.generate(model, ids, attention_mask=mask, max_new_tokens=20,
                                  eos_token_id=EOS, strategy="jacobi", window=2, ngram=3, guesses=2)
        assert torch.equal(out.sequences, want)
        plain = fastdecode.generate(model, ids, attention_mask=mask, max_new_tokens=20,
                                    eos_token_id=EOS, repetition_penalty=1.0, min_new_tokens=0)
        assert not torch.equal(plain.sequences, want)  # the defaults did something
    finally:
        model.generation_config.repetition_penalty, model.generation_config.min_new_tokens = saved


@pytest.mark.parametrize("strategy,settings", [
    ("jacobi", dict(window=2, ngram=3, guesses=4)),
    ("trie", dict(decoding_length=12, branch_length=3)),
])
def test_sampling_with_a_repetition_penalty_is_exact(strategy, settings):
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    model = small_vocab_model()
    cfg = SamplingConfig(True, temperature=0.9)
    p = exact_probs(model, cfg, RepetitionPenaltyLogitsProcessor(1.3))
    rows = 4000
    ids = torch.tensor(PROMPT).expand(rows, -1).contiguous()
    out = fastdecode.generate(model, ids, strategy=strategy, do_sample=True, temperature=0.9,
                              repetition_penalty=1.3, max_new_tokens=3, eos_token_id=[],
                              generator=torch.Generator().manual_seed(99), **settings)
    new = out.sequences[:, len(PROMPT):]
    counts = torch.zeros(VOCAB, VOCAB, VOCAB, dtype=torch.float64)
    counts.index_put_(tuple(new.T), torch.ones(rows, dtype=torch.float64), accumulate=True)
    for observed, expected in [(counts.sum((0, 1)), p.sum((0, 1))), (counts.sum(0), p.sum(0)),
                               (counts.sum(2), p.sum(2))]:
        assert chi2_pvalue(observed, rows * expected) >= P_THRESHOLD
    drafted = out.stats.drafter.get("accepted_from_pool", out.stats.drafter.get("accepted_drafts"))
    assert drafted > rows // 10  # drafts were accepted, so the per-node paths mattered


class BanLast(transformers.LogitsProcessor):
    """A history-dependent processor of a user's: the row's last token cannot come next."""

    def __call__(self, input_ids, scores):
        return scores.scatter(1, input_ids[:, -1:], float("-inf"))


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_custom_and_ngram_processors_match_transformers(kind):
    model = tiny(kind, seed=6, hidden=64)
    ids, mask = prompts(2, 14, seed=9, pad_rows={0: 3})
    for ours_args, theirs_args in (
            (dict(no_repeat_ngram_size=3), dict(no_repeat_ngram_size=3)),
            (dict(logits_processor=[BanLast()]),
             dict(logits_processor=transformers.LogitsProcessorList([BanLast()]))),
            (dict(no_repeat_ngram_size=2, logits_processor=[BanLast()], repetition_penalty=1.1),
             dict(no_repeat_ngram_size=2, repetition_penalty=1.1,
                  logits_processor=transformers.LogitsProcessorList([BanLast()])))):
        want = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=20,
                              eos_token_id=None, pad_token_id=PAD, **theirs_args)
        with flat_forward_costs(model):
            for name, kwargs in STRATEGIES.items():
                out = fastdecode.generate(model, ids, attention_mask=mask, max_new_tokens=20,
                                          eos_token_id=[], **ours_args, **kwargs)
                assert torch.equal(out.sequences, want), f"{kind} {list(ours_args)} {name}"


def test_unsupported_and_bad_processor_arguments():
    model = tiny("llama")
    ids = torch.full((1, 6), 5, dtype=torch.int64)
    with pytest.raises(TypeError, match="logits_processor must hold callables .* found str"):
        fastdecode.generate(model, ids, max_new_tokens=3, logits_processor=["x"])
    with pytest.raises(ValueError, match="no_repeat_ngram_size must be >= 0, found -1"):
        fastdecode.generate(model, ids, max_new_tokens=3, no_repeat_ngram_size=-1)
    with pytest.raises(ValueError, match=r"beam search \(num_beams=4\)"):
        fastdecode.generate(model, ids, max_new_tokens=3,
                            generation_config=transformers.GenerationConfig(num_beams=4))
    with pytest.raises(TypeError, match="num_beams"):
        fastdecode.generate(model, ids, max_new_tokens=3, num_beams=4)
