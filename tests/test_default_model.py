"""Greedy exactness on the real default model (SmolLM2-135M-Instruct, float32): jacobi at fixed
settings and on "auto", and trie, reproduce transformers' greedy generate token for token over 20
prompts (the first few run in `make test`, the rest are marked slow), and a padded batch."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

import fastdecode  # noqa: E402

PROMPTS = [
    "What is the capital of France?",
    "Write a Python function that returns the factorial of n.",
    "Repeat exactly: the quick brown fox jumps over the lazy dog.",
    "List the days of the week.",
    "Rewrite formally: hey guys, the meeting is moved to friday cuz the room is busy.",
    "Passage: The Nile is about 6650 km long and flows through eleven countries. "
    "Question: How long is the Nile? Quote the passage.",
    "Explain what a hash table is in two sentences.",
    "Translate to French: good morning, how are you?",
    "Count from 1 to 15.",
    "def add(a, b):\n    return a + b\n\nWrite a docstring for this function.",
    "Give three tips for staying focused while studying.",
    "What is 12 times 12?",
    "Summarize: Photosynthesis lets plants turn light, water and carbon dioxide into sugar "
    "and oxygen. It happens in chloroplasts.",
    "Write a haiku about the sea.",
    "Correct the typos: Teh weather is realy nice todya and we shoud go outsid.",
    "What does HTTP stand for?",
    "Write a SQL query selecting all users older than 30 from a table named users.",
    "Name the planets of the solar system in order.",
    "Why is the sky blue? Answer briefly.",
    "Continue the list: apple, banana, cherry, date,",
]
FAST = 4  # prompts that run in `make test`; the rest are marked slow
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def default_model():
    from fastdecode.models import load_default

    try:
        return load_default()
    except ImportError as err:
        pytest.skip(str(err))


def chat_ids(tokenizer, text: str) -> torch.Tensor:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                        add_generation_prompt=True, return_tensors="pt")
    return ids if isinstance(ids, torch.Tensor) else ids["input_ids"]


CASES = [pytest.param(i, marks=[] if i < FAST else [pytest.mark.slow]) for i in range(len(PROMPTS))]


@pytest.mark.parametrize("index", CASES)
def test_greedy_exact_on_default_model(default_model, index):
    model, tokenizer = default_model
    ids = chat_ids(tokenizer, PROMPTS[index])
    want = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                          max_new_tokens=NEW_TOKENS)
    for kwargs in (dict(window=7, ngram=5, guesses=7), dict(config="auto", ngram=6, guesses=6),
                   dict(strategy="trie", decoding_length=16, branch_length=6),
                   dict(strategy="trie", config="auto")):
        out = fastdecode.generate(model, ids, max_new_tokens=NEW_TOKENS, **kwargs)
        assert torch.equal(out.sequences, want), kwargs


def test_padded_batch_on_default_model(default_model):
    model, tokenizer = default_model
    texts = [PROMPTS[2], PROMPTS[5], PROMPTS[8]]
    tokenizer.padding_side = "left"
    rendered = [tokenizer.apply_chat_template([{"role": "user", "content": t}],
                                              add_generation_prompt=True, tokenize=False)
                for t in texts]
    batch = tokenizer(rendered, return_tensors="pt", padding=True)
    want = model.generate(**batch, do_sample=False, max_new_tokens=NEW_TOKENS)
    for kwargs in (dict(window=5, ngram=5, guesses=5), dict(strategy="trie"),
                   dict(strategy="trie", config="auto")):
        out = fastdecode.generate(model, batch["input_ids"], attention_mask=batch["attention_mask"],
                                  max_new_tokens=NEW_TOKENS, **kwargs)
        assert torch.equal(out.sequences, want), kwargs


def test_fastdecode_attention_on_default_model(default_model):
    """load_default(attn_implementation="fastdecode") registers the implementation, and its tree
    steps (fastdecode's tree attention, here its torch backend) reproduce greedy on a padded
    batch."""
    from fastdecode.models import load_default

    model, tokenizer = default_model
    fast, _ = load_default(attn_implementation="fastdecode")
    assert fast.config._attn_implementation == "fastdecode"
    tokenizer.padding_side = "left"
    rendered = [tokenizer.apply_chat_template([{"role": "user", "content": t}],
                                              add_generation_prompt=True, tokenize=False)
                for t in (PROMPTS[1], PROMPTS[8])]
    batch = tokenizer(rendered, return_tensors="pt", padding=True)
    want = model.generate(**batch, do_sample=False, max_new_tokens=NEW_TOKENS)
    with fastdecode.use_backend("torch", ops=["tree_attention"]):
        out = fastdecode.generate(fast, batch["input_ids"], attention_mask=batch["attention_mask"],
                                  max_new_tokens=NEW_TOKENS, strategy="trie", config="auto")
    assert torch.equal(out.sequences, want)
