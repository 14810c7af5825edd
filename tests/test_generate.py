"""fastdecode.generate on tiny random Llama and GPT-2 models: greedy output identical to
transformers' generate under many (W, N, G), batches with uneven prompts, EOS inside an
accepted n-gram, max_new_tokens reached mid-acceptance, streaming, and bad arguments."""

from __future__ import annotations

import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

import fastdecode  # noqa: E402

VOCAB, EOS, PAD = 48, 3, 0


def tiny(kind: str, seed: int = 0, vocab: int = VOCAB, hidden: int = 32):
    torch.manual_seed(seed)
    if kind == "llama":
        cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=64,
                                       num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, eos_token_id=EOS, pad_token_id=PAD,
                                       bos_token_id=1)
        model = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=2, n_head=4,
                                      eos_token_id=EOS, pad_token_id=PAD, bos_token_id=1)
        model = transformers.GPT2LMHeadModel(cfg)
    return model.eval()


def prompts(B: int, L: int, seed: int, pad_rows: dict[int, int] | None = None):
    """Repetitive prompts (so the n-gram pool has something to offer), left-padded."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(4, VOCAB, (B, 5), generator=g)
    ids = base.repeat(1, L // 5 + 1)[:, :L]
    mask = torch.ones_like(ids)
    for row, pads in (pad_rows or {}).items():
        mask[row, :pads] = 0
        ids[row, :pads] = PAD
    return ids, mask


def hf_greedy(model, ids, mask, n, eos=EOS):
    return model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=n,
                          eos_token_id=eos, pad_token_id=PAD)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("W,N,G", [(1, 2, 0), (1, 2, 1), (3, 2, 3), (2, 3, 2), (4, 4, 4),
                                   (5, 5, 0), (7, 5, 7), (1, 6, 3), (3, 3, 1)])
def test_greedy_matches_transformers(kind, W, N, G):
    model = tiny(kind)
    ids, mask = prompts(2, 17, seed=W * 100 + N * 10 + G, pad_rows={1: 6})
    want = hf_greedy(model, ids, mask, 40, eos=None)
    out = fastdecode.generate(model, ids, attention_mask=mask, strategy="jacobi",
                              max_new_tokens=40, eos_token_id=[], window=W, ngram=N, guesses=G)
    assert torch.equal(out.sequences, want)
    assert out.stats.new_tokens == 80


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_jacobi_accepts_several_tokens_per_step(kind):
    """Tiny random models loop, so the pool's n-grams get accepted: fewer steps than tokens."""
    model = tiny(kind)
    ids, mask = prompts(1, 25, seed=5)
    out = fastdecode.generate(model, ids, attention_mask=mask, strategy="jacobi",
                              max_new_tokens=60, eos_token_id=[], window=4, ngram=4, guesses=4)
    assert torch.equal(out.sequences, hf_greedy(model, ids, mask, 60, eos=None))
    assert out.stats.steps < 60 and max(out.stats.accepted_hist) > 1
    assert out.stats.drafter["pool_hits"] > 0


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_batch_with_uneven_prompts_and_eos(kind):
    model = tiny(kind, seed=1)
    ids, mask = prompts(4, 21, seed=9, pad_rows={1: 7, 2: 15, 3: 1})
    plain = hf_greedy(model, ids, mask, 50, eos=None)
    for cut in (3, 12, 30):  # an EOS that appears at different points of different rows
        eos = int(plain[0, 21 + cut])
        want = hf_greedy(model, ids, mask, 50, eos=eos)
        for strategy in ("greedy", "jacobi"):
            out = fastdecode.generate(model, ids, attention_mask=mask, strategy=strategy,
                                      max_new_tokens=50, eos_token_id=eos, window=3, ngram=4,
                                      guesses=5)
            assert torch.equal(out.sequences, want), (strategy, eos)


@pytest.mark.parametrize("n", [0, 1, 2, 7, 33])
def test_max_new_tokens_mid_acceptance(n):
    model = tiny("llama", seed=2)
    ids, mask = prompts(2, 30, seed=3, pad_rows={0: 4})
    out = fastdecode.generate(model, ids, attention_mask=mask, max_new_tokens=n,
                              eos_token_id=[], window=4, ngram=5, guesses=6)
    assert torch.equal(out.sequences, hf_greedy(model, ids, mask, n, eos=None) if n else ids)
    assert out.stats.new_tokens == 2 * n


def test_right_padded_prompts_are_moved_left():
    model = tiny("llama")
    ids, mask = prompts(2, 12, seed=4, pad_rows={1: 3})
    right_ids = ids.clone()
    right_mask = mask.clone()
    right_ids[1] = torch.cat([ids[1, 3:], ids[1, :3]])
    right_mask[1] = torch.cat([mask[1, 3:], mask[1, :3]])
    a = fastdecode.generate(model, ids, attention_mask=mask, max_new_tokens=10, eos_token_id=[])
    b = fastdecode.generate(model, right_ids, attention_mask=right_mask, max_new_tokens=10,
                            eos_token_id=[])
    assert torch.equal(a.sequences[:, 12:], b.sequences[:, 12:])
    assert torch.equal(b.sequences[:, :12], right_ids)


class Recorder:
    def __init__(self):
        self.calls = []
        self.ended = False

    def put(self, value):
        self.calls.append(value.clone())

    def end(self):
        self.ended = True


def test_streamer_gets_prompt_then_every_token():
    model = tiny("gpt2")
    ids, mask = prompts(2, 15, seed=6, pad_rows={0: 2})
    rec = Recorder()
    out = fastdecode.generate(model, ids, attention_mask=mask, max_new_tokens=25,
                              eos_token_id=[], streamer=rec, window=3, ngram=3, guesses=3)
    assert rec.ended and torch.equal(rec.calls[0], ids)
    assert torch.equal(torch.stack(rec.calls[1:], dim=1), out.sequences[:, 15:])


def test_stats_are_consistent():
    model = tiny("llama")
    ids, mask = prompts(1, 20, seed=7)
    s = fastdecode.generate(model, ids, max_new_tokens=30, eos_token_id=[]).stats
    assert sum(k * v for k, v in s.accepted_hist.items()) == s.new_tokens == 30
    assert s.steps == sum(s.accepted_hist.values())
    assert s.mean_accepted == pytest.approx(30 / s.steps)
    assert s.forward_s > 0 and s.overhead_s > 0 and s.tokens_per_s > 0


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(window=0), ValueError, "window must be >= 1, found 0"),
    (dict(ngram=1), ValueError, "ngram must be >= 2, found 1"),
    (dict(guesses=-1), ValueError, "guesses must be >= 0, found -1"),
    (dict(max_new_tokens=-1), ValueError, "max_new_tokens must be >= 0, found -1"),
    (dict(attention_mask=torch.ones(1, 4, dtype=torch.int64)), ValueError,
     r"attention_mask must have the shape of input_ids \(1, 6\), found \(1, 4\)"),
    (dict(attention_mask=torch.zeros(1, 6, dtype=torch.int64)), ValueError, "no tokens"),
    (dict(strategy="beam"), ValueError,
     "strategy must be one of plain, jacobi, trie, prompt_lookup, greedy, sample, found 'beam'"),
    (dict(temperature=0.0, do_sample=True), ValueError, "temperature must be > 0"),
    (dict(top_p=1.5, do_sample=True), ValueError, r"top_p must be None or in \(0, 1\]"),
    (dict(min_p=1.5, do_sample=True), ValueError, r"min_p must be None or in \[0, 1\], found 1.5"),
    (dict(max_new_tokens=None, max_length=0), ValueError, "max_length must be >= 1, found 0"),
    (dict(pad_token_id=-2), ValueError, "pad_token_id must be >= 0, found -2"),
    (dict(pad_token_id=1.0), TypeError, "pad_token_id must be an int, found float"),
    (dict(config="fast"), ValueError, "config must be None or 'auto'"),
])
def test_bad_arguments(kwargs, exc, match):
    model = tiny("llama")
    args = dict(max_new_tokens=5)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        fastdecode.generate(model, torch.full((1, 6), 5, dtype=torch.int64), **args)


def test_plain_and_its_shorthands():
    """strategy names how a step drafts; "greedy" and "sample" are "plain" with do_sample False
    and True; "greedy" with do_sample=True samples, as before, and warns."""
    model = tiny("llama", seed=6)
    ids = torch.full((1, 6), 5, dtype=torch.int64)

    def run(**kw) -> torch.Tensor:
        return fastdecode.generate(model, ids, max_new_tokens=12, eos_token_id=[],
                                   generator=torch.Generator().manual_seed(3), **kw).sequences

    assert torch.equal(run(strategy="plain"), run(strategy="greedy"))
    sampled = run(strategy="plain", do_sample=True)
    assert torch.equal(sampled, run(strategy="sample"))
    with pytest.warns(DeprecationWarning, match="strategy='greedy' with do_sample=True samples"):
        assert torch.equal(run(strategy="greedy", do_sample=True), sampled)


def test_models_that_cannot_take_tree_masks_are_named():
    with pytest.raises(TypeError, match="model must be a transformers PreTrainedModel, found Linear"):
        fastdecode.generate(torch.nn.Linear(2, 2), torch.ones(1, 2, dtype=torch.int64),
                            max_new_tokens=2)
    model = tiny("llama")
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="LlamaForCausalLM uses attn_implementation='flash_attention_2'"):
        fastdecode.generate(model, torch.ones(1, 2, dtype=torch.int64), max_new_tokens=2)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_auto_config_never_changes_the_output(kind):
    model = tiny(kind, seed=3)
    ids, mask = prompts(3, 24, seed=8, pad_rows={2: 9})
    want = hf_greedy(model, ids, mask, 45, eos=None)
    out = fastdecode.generate(model, ids, attention_mask=mask, config="auto", max_new_tokens=45,
                              eos_token_id=[], ngram=6, guesses=6)
    assert torch.equal(out.sequences, want)
    auto = out.stats.drafter["auto"]
    assert sum(auto["choices"].values()) == out.stats.steps - 1
    from fastdecode.decoding.step_costs import PROBE_TOKENS

    assert set(PROBE_TOKENS) <= set(auto["cost_s"])  # probed, then refined by real steps


@pytest.mark.parametrize("backend", [
    "torch",
    pytest.param("triton", marks=pytest.mark.skipif(
        os.environ.get("TRITON_INTERPRET") != "1", reason="Triton on the CPU needs TRITON_INTERPRET=1")),
])
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_fastdecode_attention_implementation(kind, backend):
    """attn_implementation="fastdecode": tree steps run fastdecode's tree attention (the Triton
    kernel under the interpreter, or its reference) and stay exact."""
    import fastdecode.hf  # noqa: F401  (registers "fastdecode" with transformers)

    model = tiny(kind, seed=4, hidden=64)  # head dim 16, the kernel's smallest
    ids, mask = prompts(2, 14, seed=2, pad_rows={0: 5})
    n = 20 if backend == "torch" else 6  # the interpreter is slow
    want = hf_greedy(model, ids, mask, n, eos=None)
    model.set_attn_implementation("fastdecode")
    try:
        with fastdecode.use_backend(backend, ops=["tree_attention"]):
            out = fastdecode.generate(model, ids, attention_mask=mask, max_new_tokens=n,
                                      eos_token_id=[], window=3, ngram=3, guesses=3)
    finally:
        model.set_attn_implementation("sdpa")
    assert torch.equal(out.sequences, want)


def test_qwen2_greedy_matches_transformers():
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, eos_token_id=EOS, pad_token_id=PAD)
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    ids, mask = prompts(2, 16, seed=12, pad_rows={1: 4})
    out = fastdecode.generate(model, ids, attention_mask=mask, max_new_tokens=30,
                              eos_token_id=[], window=4, ngram=4, guesses=4)
    assert torch.equal(out.sequences, hf_greedy(model, ids, mask, 30, eos=None))


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_prefill_projects_only_the_last_position(kind):
    """TreeRunner.prefill asks the model for the last position's logits only (a vocabulary
    projection per prompt token is the largest cost of a long prompt's prefill on a CPU), and
    they equal the full forward's last row."""
    from fastdecode.hf.model import TreeRunner

    model = tiny(kind, seed=5)
    ids, mask = prompts(2, 13, seed=5, pad_rows={0: 4})
    shapes = []
    hook = model.get_output_embeddings().register_forward_hook(
        lambda module, args, out: shapes.append(tuple(out.shape)))
    try:
        last = TreeRunner(model).prefill(ids, mask)
    finally:
        hook.remove()
    assert shapes == [(2, 1, VOCAB)]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1]
    torch.testing.assert_close(last, full)


def test_budget_arguments_read_as_in_transformers():
    """max_length counts the (padded) prompt; without either budget the model's generation
    config decides (its max_new_tokens, else its max_length); max_new_tokens wins over
    max_length, with a warning."""
    model = tiny("llama", seed=2)
    ids, mask = prompts(2, 11, seed=4, pad_rows={1: 3})

    def ours(**kw) -> torch.Tensor:
        return fastdecode.generate(model, ids, attention_mask=mask, eos_token_id=[], **kw).sequences

    def theirs(**kw) -> torch.Tensor:
        return model.generate(ids, attention_mask=mask, do_sample=False, eos_token_id=None,
                              pad_token_id=PAD, **kw)

    assert torch.equal(ours(max_length=19), theirs(max_length=19))
    assert ours(max_length=19).shape == (2, 19)
    saved = model.generation_config.max_new_tokens, model.generation_config.max_length
    try:
        model.generation_config.max_new_tokens = None
        model.generation_config.max_length = 15
        assert torch.equal(ours(), theirs())
        assert ours().shape == (2, 15)
        model.generation_config.max_new_tokens = 6
        assert torch.equal(ours(), theirs())
        assert ours().shape == (2, 17)
    finally:
        model.generation_config.max_new_tokens, model.generation_config.max_length = saved
    with pytest.warns(UserWarning, match="max_new_tokens takes precedence"):
        assert ours(max_new_tokens=4, max_length=30).shape == (2, 15)


def test_pad_token_id_pads_finished_rows():
    model = tiny("llama", seed=1)
    ids, mask = prompts(2, 9, seed=3)
    plain = hf_greedy(model, ids, mask, 20, eos=None)
    eos = int(plain[0, 12])  # row 0 stops at its 4th new token
    out = fastdecode.generate(model, ids, attention_mask=mask, max_new_tokens=20, eos_token_id=eos,
                              pad_token_id=7, strategy="jacobi", window=3, ngram=3, guesses=3)
    want = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=20,
                          eos_token_id=eos, pad_token_id=7)
    assert torch.equal(out.sequences, want)
    assert (out.sequences[0, 13:] == 7).all()


@pytest.mark.parametrize("kwargs,named", [
    (dict(temperature=0.7), "temperature=0.7 is"), (dict(top_k=5), "top_k=5 is"),
    (dict(top_p=0.9, min_p=0.1), "top_p=0.9, min_p=0.1 are")])
def test_sampling_arguments_without_do_sample_warn(kwargs, named):
    """As in transformers: greedy decoding ignores them, and says so."""
    model = tiny("llama", seed=3)
    ids = torch.full((1, 6), 5, dtype=torch.int64)
    greedy = fastdecode.generate(model, ids, max_new_tokens=8, eos_token_id=[]).sequences
    with pytest.warns(UserWarning, match=f"do_sample is False, so {named} not used"):
        out = fastdecode.generate(model, ids, max_new_tokens=8, eos_token_id=[], **kwargs)
    assert torch.equal(out.sequences, greedy)


def test_defaults_of_sampling_arguments_do_not_warn(recwarn):
    model = tiny("llama", seed=3)
    fastdecode.generate(model, torch.full((1, 6), 5, dtype=torch.int64), max_new_tokens=3,
                        temperature=1.0, top_p=1.0)
    assert not [w for w in recwarn if "do_sample" in str(w.message)]
