"""Sampling stays exact: processed distributions match transformers' warpers, and lookahead
sampling draws the same token distribution as plain sampling (chi-square tests against the
model's exact probabilities, with a fixed seed and a fixed threshold p >= 1e-3)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import flat_forward_costs

transformers = pytest.importorskip("transformers")

import fastdecode  # noqa: E402
from fastdecode.decoding.sampling import SamplingConfig, processed_logits  # noqa: E402

P_THRESHOLD = 1e-3  # a correct sampler fails this about once in a thousand seeds; the seed is fixed


def chi2_sf(x: float, dof: int) -> float:
    """P(chi2_dof >= x): the regularized upper incomplete gamma Q(dof/2, x/2)."""
    a, z = dof / 2, x / 2
    if z <= 0:
        return 1.0
    log_front = a * math.log(z) - z - math.lgamma(a)
    if z < a + 1:  # series for P, then Q = 1 - P
        term = total = 1 / a
        n = 0
        while abs(term) > 1e-15 * abs(total):
            n += 1
            term *= z / (a + n)
            total += term
        return max(0.0, 1 - math.exp(log_front) * total)
    # continued fraction for Q (modified Lentz)
    b, c, d = z + 1 - a, 1e300, 1 / (z + 1 - a)
    h = d
    for i in range(1, 500):
        an = -i * (i - a)
        b += 2
        d = an * d + b
        d = 1 / (d if abs(d) > 1e-300 else 1e-300)
        c = b + an / c
        c = c if abs(c) > 1e-300 else 1e-300
        h *= d * c
        if abs(d * c - 1) < 1e-15:
            break
    return math.exp(log_front) * h


def chi2_pvalue(observed: torch.Tensor, expected: torch.Tensor) -> float:
    """Pearson's test, cells with expected count < 5 pooled into one."""
    observed, expected = observed.double().flatten(), expected.double().flatten()
    small = expected < 5
    obs = torch.cat([observed[~small], observed[small].sum()[None]])
    exp = torch.cat([expected[~small], expected[small].sum()[None]])
    keep = exp > 0
    stat = float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
    return chi2_sf(stat, int(keep.sum()) - 1)


def test_chi2_sf_known_values():
    assert chi2_sf(3.841458820694124, 1) == pytest.approx(0.05, rel=1e-6)
    assert chi2_sf(18.307038053275146, 10) == pytest.approx(0.05, rel=1e-6)
    assert chi2_sf(124.34211340400407, 100) == pytest.approx(0.05, rel=1e-6)


@pytest.mark.parametrize("temperature,top_k,top_p,min_p", [
    (0.7, None, None, None), (1.0, 5, None, None), (1.3, None, 0.8, None), (0.9, 20, 0.6, None),
    (1.0, None, None, 0.1), (0.8, 30, 0.95, 0.05), (1.2, None, None, 1.0)])
def test_processed_logits_match_transformers_warpers(temperature, top_k, top_p, min_p):
    from transformers.generation.logits_process import (
        MinPLogitsWarper,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(3)) * 3
    want = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k is not None:
        want = TopKLogitsWarper(top_k)(None, want)
    if top_p is not None:
        want = TopPLogitsWarper(top_p)(None, want)
    if min_p is not None:
        want = MinPLogitsWarper(min_p)(None, want)
    got = processed_logits(logits, SamplingConfig(True, temperature, top_k, top_p, min_p))
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    assert torch.allclose(got[~torch.isinf(got)], want[~torch.isinf(want)])


VOCAB = 8
PROMPT = [1, 2, 3, 1, 2, 3, 1, 2, 3, 1]


def small_vocab_model():
    torch.manual_seed(11)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32,
                                   num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=1, bos_token_id=0, eos_token_id=0,
                                   pad_token_id=0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # sharpen the distribution so that drafts get accepted often
        model.lm_head.weight.mul_(6)
    return model


def exact_probs(model, cfg: SamplingConfig, rule=None) -> torch.Tensor:
    """p(t1, t2, t3) after PROMPT, float64 [V, V, V], by enumerating every continuation;
    ``rule`` (a transformers logits processor) processes each context's logits first."""
    prompt = torch.tensor(PROMPT)
    with torch.no_grad():
        def next_probs(ctx: torch.Tensor) -> torch.Tensor:
            logits = model(ctx).logits[:, -1].float()
            if rule is not None:
                logits = rule(ctx, logits)
            return processed_logits(logits, cfg).softmax(-1).double()

        p1 = next_probs(prompt[None])[0]
        t1 = torch.arange(VOCAB)
        p2 = next_probs(torch.cat([prompt.expand(VOCAB, -1), t1[:, None]], 1))
        pairs = torch.cartesian_prod(t1, t1)
        p3 = next_probs(torch.cat([prompt.expand(VOCAB**2, -1), pairs], 1)).view(VOCAB, VOCAB, VOCAB)
    return p1[:, None, None] * p2[:, :, None] * p3


@pytest.mark.parametrize("strategy,settings", [
    ("sample", {}),
    ("jacobi", dict(window=2, ngram=3, guesses=4)),
    ("jacobi", dict(window=1, ngram=4, guesses=6)),
    ("trie", dict(decoding_length=12, branch_length=3)),
    ("trie", dict(decoding_length=12, branch_length=3, config="auto")),
])
def test_sampling_distribution_is_exact(strategy, settings):
    model = small_vocab_model()
    cfg = SamplingConfig(True, temperature=0.9, top_k=6, top_p=0.97)
    p = exact_probs(model, cfg)
    rows = 4000
    ids = torch.tensor(PROMPT).expand(rows, -1).contiguous()
    # auto's choices must not depend on how fast this machine runs the forwards
    with flat_forward_costs(model):
        out = fastdecode.generate(model, ids, strategy=strategy, do_sample=True, temperature=0.9,
                                  top_k=6, top_p=0.97, max_new_tokens=3, eos_token_id=[],
                                  generator=torch.Generator().manual_seed(1234), **settings)
    new = out.sequences[:, len(PROMPT):]
    counts = torch.zeros(VOCAB, VOCAB, VOCAB, dtype=torch.float64)
    counts.index_put_(tuple(new.T), torch.ones(rows, dtype=torch.float64), accumulate=True)
    # the next token after each drafted position, and the two-token frequencies
    for observed, expected in [(counts.sum((0, 1)), p.sum((0, 1))),
                               (counts.sum(0), p.sum(0)),
                               (counts.sum(2), p.sum(2))]:
        assert chi2_pvalue(observed, rows * expected) >= P_THRESHOLD
    drafted = out.stats.drafter.get("accepted_from_pool", out.stats.drafter.get("accepted_drafts"))
    if strategy != "sample":  # the test is only meaningful if drafts were accepted
        assert drafted > rows // 10
