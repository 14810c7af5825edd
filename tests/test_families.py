"""The coverage matrix: tiny random models (hidden 64, 2 layers, vocab 256) built from
transformers' own configs for every decoder family fastdecode supports, each with a context
longer than its sliding window where it has one, on every strategy, with transformers' attention
(sdpa; eager for Gemma2, whose soft-cap sdpa cannot run) and with ``attn_implementation=
"fastdecode"``, a batch of 2 with left padding: all equal to transformers' greedy ``generate``
token for token. Also: the position limit of learned positions, and layer types fastdecode does
not run."""

from __future__ import annotations

import pytest
import torch
from conftest import flat_forward_costs

transformers = pytest.importorskip("transformers")

import fastdecode  # noqa: E402
import fastdecode.hf  # noqa: E402,F401  (registers attn_implementation="fastdecode")
from fastdecode import _backend  # noqa: E402

VOCAB, EOS, PAD = 256, 3, 0
WINDOW = 8
LLAMA_LIKE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  eos_token_id=EOS, pad_token_id=PAD, bos_token_id=1)
SLIDING_QWEN = dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
GEMMA = dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=WINDOW)

# family: (config class, model class, config arguments beyond LLAMA_LIKE)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", SLIDING_QWEN),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {**SLIDING_QWEN, "head_dim": 16}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": WINDOW}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"sliding_window": WINDOW}),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", {}),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {}),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}),
    "granite": ("GraniteConfig", "GraniteForCausalLM", {}),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  {**MOE, "head_dim": 16, "use_sliding_window": True, "sliding_window": WINDOW}),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                {"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": WINDOW}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
               {**GEMMA, "attn_logit_softcapping": 2.0, "final_logit_softcapping": 5.0}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",
               {**GEMMA, "layer_types": ["sliding_attention", "full_attention"]}),
}
GPT2_ARGS = dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=256,
                 eos_token_id=EOS, pad_token_id=PAD, bos_token_id=1)

STRATEGIES = {
    "greedy": dict(strategy="greedy"),
    "jacobi": dict(strategy="jacobi", window=3, ngram=3, guesses=3),
    "trie": dict(strategy="trie"),
    "prompt_lookup": dict(strategy="prompt_lookup"),
    "jacobi-auto": dict(strategy="jacobi", config="auto"),
    "trie-auto": dict(strategy="trie", config="auto"),
}
NEW_TOKENS = 16


def tiny(family: str, attn: str, seed: int = 0, **change):
    """The family's tiny random model in eval mode, with attention ``attn``."""
    config_name, model_name, extra = FAMILIES[family]
    args = GPT2_ARGS if family == "gpt2" else {**LLAMA_LIKE, **extra}
    config = getattr(transformers, config_name)(**{**args, **change})
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).eval()
    model.set_attn_implementation(attn)
    return model


def prompts(L: int = 21, pads: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two repetitive prompts of L tokens, the second left-padded by ``pads``: both longer than
    the window."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, VOCAB, (2, 6), generator=g).repeat(1, L // 6 + 1)[:, :L]
    mask = torch.ones_like(ids)
    mask[1, :pads], ids[1, :pads] = 0, PAD
    return ids, mask


def transformers_attention(family: str) -> str:
    return "eager" if family == "gemma2" else "sdpa"


def hf_greedy(model, ids, mask, n: int = NEW_TOKENS) -> torch.Tensor:
    return model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=n,
                          eos_token_id=EOS, pad_token_id=PAD)


@pytest.mark.parametrize("attn", ["transformers", "fastdecode"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_strategy_matches_transformers_greedy(family, attn):
    model = tiny(family, transformers_attention(family))
    ids, mask = prompts()
    want = hf_greedy(model, ids, mask)
    if attn == "fastdecode":
        model.set_attn_implementation("fastdecode")
    with flat_forward_costs(model):  # "auto" drafts as on a GPU, whatever this machine's speed
        for name, kwargs in STRATEGIES.items():
            out = fastdecode.generate(model, ids, attention_mask=mask,
                                      max_new_tokens=NEW_TOKENS, **kwargs)
            assert torch.equal(out.sequences, want), f"{family}, {attn} attention, {name}"


@pytest.mark.parametrize("family", ["mistral", "gemma2", "qwen2"])
def test_the_window_matters(family):
    """The matrix would catch an ignored window: without it these models answer otherwise."""
    ids, mask = prompts()
    windowed = hf_greedy(tiny(family, transformers_attention(family)), ids, mask)
    change = {"use_sliding_window": False} if family == "qwen2" else {"sliding_window": None}
    if family == "gemma2":
        change = {"sliding_window": 10_000}
    full = hf_greedy(tiny(family, transformers_attention(family), **change), ids, mask)
    assert not torch.equal(windowed, full)


@pytest.mark.parametrize("family", ["gemma2", "mistral"])
def test_triton_tree_attention_in_a_windowed_model(family):
    """The Triton kernel (under the interpreter on the CPU) inside a sliding-window model, and
    Gemma2's soft-cap."""
    if _backend._why_not("triton", "cpu") is not None:
        pytest.skip(f"triton backend: {_backend._why_not('triton', 'cpu')}")
    model = tiny(family, transformers_attention(family))
    ids, mask = prompts()
    want = hf_greedy(model, ids, mask, 6)
    model.set_attn_implementation("fastdecode")
    with fastdecode.use_backend("triton", ops=["tree_attention"]):
        out = fastdecode.generate(model, ids, attention_mask=mask, max_new_tokens=6,
                                  strategy="jacobi", window=2, ngram=3, guesses=2)
    assert torch.equal(out.sequences, want)


def test_learned_positions_run_to_their_limit():
    """GPT-2 with 16 positions: a prompt of 10 and 7 new tokens feeds positions 0..15, and every
    strategy's drafts past the limit stay harmless; one more token is a clear ValueError."""
    model = tiny("gpt2", "sdpa", n_positions=16)
    ids, mask = prompts(L=10, pads=3)
    want = hf_greedy(model, ids, mask, 7)
    for name, kwargs in STRATEGIES.items():
        out = fastdecode.generate(model, ids, attention_mask=mask, max_new_tokens=7, **kwargs)
        assert torch.equal(out.sequences, want), name
    with pytest.raises(ValueError, match=r"GPT2LMHeadModel has 16 learned positions "
                                         r"\(max_position_embeddings\).* found 10 \+ 8 - 1 = 17"):
        fastdecode.generate(model, ids, attention_mask=mask, max_new_tokens=8)


def test_rotary_models_have_no_position_limit():
    from fastdecode.hf.model import position_limit

    assert position_limit(tiny("llama", "sdpa")) is None
    assert position_limit(tiny("gpt2", "sdpa", n_positions=16)) == 16


def test_unknown_layer_types_are_refused():
    model = tiny("gemma3", "sdpa")
    model.config.layer_types = ["chunked_attention", "full_attention"]
    with pytest.raises(TypeError, match="Gemma3ForCausalLM has layers of type chunked_attention"):
        fastdecode.generate(model, torch.tensor([[5, 6, 7]]), max_new_tokens=2)
