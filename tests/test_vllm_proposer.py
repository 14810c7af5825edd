"""fastdecode.integrations.vllm.TrieProposer without vLLM: a fake ``VllmConfig`` and a small
simulator of vLLM's persistent batch (rows of ``token_ids_cpu`` that requests join, leave and
move between), whose "model" continues each request deterministically and accepts the longest
prefix of the draft it was given."""

from __future__ import annotations

import random
from collections.abc import Callable
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fastdecode.integrations.engine_costs import EngineStepCosts
from fastdecode.integrations.vllm import TOKEN_COST_ENV, TrieProposer

K = 8


def config(k: object = K, vocab: object = 1000, max_num_seqs: object = 4) -> SimpleNamespace:
    return SimpleNamespace(
        speculative_config=SimpleNamespace(num_speculative_tokens=k),
        model_config=SimpleNamespace(get_vocab_size=lambda: vocab),
        scheduler_config=SimpleNamespace(max_num_seqs=max_num_seqs))


def copying(prompt: list[int]) -> Callable[[int], int]:
    """A model that repeats its prompt: the token at each position after it."""
    return lambda pos: prompt[(pos - len(prompt)) % len(prompt)]


def random_text(seed: int, vocab: range) -> Callable[[int], int]:
    """A model that copies nothing: a fixed pseudo-random token per position."""
    return lambda pos: random.Random(seed * 1_000_003 + pos).choice(vocab)


def permutation(seed: int, vocab: range) -> list[int]:
    tokens = list(vocab)
    random.Random(seed).shuffle(tokens)
    return tokens


class Request:
    """A request whose model emits ``truth(position)``; ``chunks`` steps of prefill (all but the
    last sample nothing), then each step verifies its draft."""

    def __init__(self, prompt: list[int], truth: Callable[[int], int], max_new: int = 10**6,
                 chunks: int = 1) -> None:
        self.prompt, self.truth, self.max_new = list(prompt), truth, max_new
        self.out: list[int] = []
        self.draft: list[int] = []
        self.prefill_left = chunks

    def restart(self) -> None:
        """Preempted and scheduled again from its prompt (the output is recomputed)."""
        self.out, self.draft, self.prefill_left = [], [], 1

    @property
    def done(self) -> bool:
        return len(self.out) >= self.max_new

    def sample(self) -> list[int]:
        n = len(self.prompt) + len(self.out)
        if self.prefill_left:
            self.prefill_left -= 1
            if self.prefill_left:
                return []
            tokens = [self.truth(n)]
        else:
            true = [self.truth(n + j) for j in range(len(self.draft) + 1)]
            accepted = 0
            while accepted < len(self.draft) and self.draft[accepted] == true[accepted]:
                accepted += 1
            tokens = true[:accepted + 1]
        tokens = tokens[:self.max_new - len(self.out)]
        self.out += tokens
        return tokens


class Batch:
    """vLLM's persistent batch as the proposer sees it: ``token_ids_cpu`` (int32
    ``[rows, max_len]``) and ``num_tokens_no_spec``, this step's tokens written in before the
    proposer runs. ``log`` holds every draft: (request, position of its first token, draft)."""

    def __init__(self, proposer: TrieProposer, rows: int = 4, max_len: int = 512) -> None:
        self.proposer = proposer
        self.tokens = np.zeros((rows, max_len), dtype=np.int32)
        self.counts = np.zeros(rows, dtype=np.int32)
        self.reqs: list[Request | None] = [None] * rows
        self.log: list[tuple[Request, int, list[int]]] = []

    def put(self, row: int, req: Request) -> None:
        tokens = req.prompt + req.out
        self.tokens[row, :len(tokens)] = tokens
        self.counts[row] = len(tokens)
        self.reqs[row] = req

    def remove(self, row: int) -> None:
        self.reqs[row] = None
        self.counts[row] = 0  # the row's old tokens stay behind, as in vLLM

    def move(self, order: list[int]) -> None:
        """Row i takes what row ``order[i]`` held."""
        self.tokens = self.tokens[order].copy()
        self.counts = self.counts[order].copy()
        self.reqs = [self.reqs[j] for j in order]

    def step(self, inputs: str = "numpy") -> list[list[int]]:
        sampled = []
        for i, req in enumerate(self.reqs):
            tokens = [] if req is None else req.sample()
            n = self.counts[i]
            self.tokens[i, n:n + len(tokens)] = tokens
            self.counts[i] += len(tokens)
            sampled.append(tokens)
        if inputs == "numpy":
            drafts = self.proposer.propose(sampled, self.counts, self.tokens)
        else:  # the other types the proposer takes
            drafts = self.proposer.propose([np.array(s, dtype=np.int64) for s in sampled],
                                           self.counts.tolist(), torch.from_numpy(self.tokens),
                                           slot_mappings=None)
        assert len(drafts) == len(self.reqs)
        for i, (req, draft, sampled_row) in enumerate(zip(self.reqs, drafts, sampled)):
            assert isinstance(draft, list) and all(type(t) is int for t in draft)
            assert len(draft) <= self.proposer.k
            if not sampled_row:
                assert draft == []
            if req is not None:
                req.draft = draft
                if draft:
                    self.log.append((req, int(self.counts[i]), draft))
        return drafts

    def run(self, steps: int) -> None:
        for _ in range(steps):
            self.step()


def assert_correct(log: list[tuple[Request, int, list[int]]]) -> None:
    """Every draft is the start of its own request's continuation."""
    for req, at, draft in log:
        assert draft == [req.truth(at + j) for j in range(len(draft))]


def test_copying_text_gets_correct_long_drafts():
    proposer = TrieProposer(config())
    batch = Batch(proposer, rows=3)
    reqs = []
    for row in range(3):
        prompt = permutation(row, range(100 * row, 100 * row + 40))
        reqs.append(Request(prompt, copying(prompt), max_new=120))
        batch.put(row, reqs[-1])
    steps = 0
    while not all(r.done for r in reqs):
        batch.step()
        steps += 1
    assert_correct(batch.log)
    assert steps <= 25  # 120 tokens each: most steps accept whole drafts
    assert max(len(d) for _, _, d in batch.log) == K
    stats = proposer.stats()
    assert stats["accepted_tokens"] >= 300 and stats["requests_started"] == 3
    assert 0 < stats["propose_seconds"] < 10
    assert proposer.trie.stats()["requests"] == 3


def test_input_types_give_the_same_drafts():
    def run(inputs: str) -> list[list[list[int]]]:
        batch = Batch(TrieProposer(config()), rows=2)
        for row in range(2):
            prompt = permutation(7 + row, range(50))
            batch.put(row, Request(prompt, copying(prompt)))
        return [batch.step(inputs) for _ in range(6)]

    numpy_drafts = run("numpy")
    assert any(any(d) for d in numpy_drafts)
    assert run("lists, numpy rows and a torch tensor") == numpy_drafts


def test_state_follows_reordered_rows():
    """Rows move every step. A and B write the same tokens in different orders, so a row served
    another request's counts would draft wrong tokens; C and D have vocabularies of their own."""
    proposer = TrieProposer(config())
    batch = Batch(proposer, rows=4)
    vocabs = [range(40), range(40), range(100, 140), range(200, 240)]
    reqs = []
    for row, vocab in enumerate(vocabs):
        prompt = permutation(row, vocab)
        reqs.append(Request(prompt, copying(prompt)))
        batch.put(row, reqs[-1])
    rng = random.Random(0)
    for _ in range(20):
        batch.step()
        order = list(range(4))
        rng.shuffle(order)
        batch.move(order)
    assert_correct(batch.log)
    for req, vocab in zip(reqs[2:], vocabs[2:]):
        drafts = [d for r, _, d in batch.log if r is req]
        assert drafts and all(t in vocab for d in drafts for t in d)
    assert proposer.stats()["requests_started"] == 4  # no request started over
    assert proposer.trie.stats()["requests"] == 4


def test_finished_request_goes_to_the_shared_counts_and_its_row_is_reused():
    proposer = TrieProposer(config())
    batch = Batch(proposer, rows=2)
    first = permutation(1, range(60))
    a = Request(first, copying(first), max_new=70)
    batch.put(0, a)
    while not a.done:
        batch.step()
    batch.remove(0)
    second = permutation(2, range(500, 560))
    b = Request(second, copying(second), max_new=40)
    batch.put(0, b)
    batch.step()  # b's prefill: a's row state does not match and ends
    assert proposer.trie.stats()["requests"] == 1
    assert proposer.trie.count(a.out[10:13], source="shared") > 0
    batch.run(10)
    b_drafts = [d for r, _, d in batch.log if r is b]
    assert b_drafts and all(500 <= t < 560 for d in b_drafts for t in d)
    # a request like a, in the other row, drafts from the shared counts from its first step
    again = Request(first, copying(first))
    batch.put(1, again)
    drafts = batch.step()
    assert len(drafts[1]) == K
    assert_correct(batch.log)


def test_condensed_batch_keeps_the_moved_request():
    """vLLM's condense: a request finishes and the last row moves into its place."""
    proposer = TrieProposer(config())
    batch = Batch(proposer, rows=2)
    first, second = permutation(10, range(40)), permutation(11, range(300, 340))
    short, moved = Request(first, copying(first), max_new=20), Request(second, copying(second))
    batch.put(0, short)
    batch.put(1, moved)
    while not short.done:
        batch.step()
    before = len(batch.log)
    batch.move([1])  # one row left, holding the moved request
    batch.run(3)
    assert len(batch.log) > before and all(r is moved for r, _, _ in batch.log[before:])
    assert proposer.stats()["requests_started"] == 2
    assert proposer.trie.stats()["requests"] == 1
    assert proposer.trie.count(short.out[5:8], source="shared") > 0
    assert_correct(batch.log)


def test_preempted_request_starts_over():
    proposer = TrieProposer(config())
    batch = Batch(proposer, rows=1)
    prompt = permutation(3, range(80))
    req = Request(prompt, copying(prompt))
    batch.put(0, req)
    batch.run(5)
    assert len(req.out) > 10
    req.restart()
    batch.put(0, req)  # the row shrinks back to the prompt
    drafts = batch.step()
    assert len(drafts[0]) == K  # from the shared counts the first run left
    assert proposer.stats()["requests_started"] == 2
    assert proposer.trie.stats()["requests"] == 1
    batch.run(5)
    assert_correct(batch.log)


def test_resumed_request_with_its_output_keeps_its_state():
    proposer = TrieProposer(config())
    batch = Batch(proposer, rows=2)
    prompt = permutation(4, range(80))
    req = Request(prompt, copying(prompt))
    batch.put(0, req)
    batch.run(4)
    batch.remove(0)
    batch.put(1, req)  # back in another row with its prompt and output
    batch.run(4)
    assert proposer.stats()["requests_started"] == 1
    assert_correct(batch.log)


def test_prefilling_and_unused_rows_get_nothing():
    proposer = TrieProposer(config())
    batch = Batch(proposer, rows=3)
    prompt = permutation(5, range(40))
    copier = Request(prompt, copying(prompt))
    batch.put(0, copier)
    batch.run(2)
    # a long prompt in chunks, whose text would draft at once
    chunked = Request(prompt + prompt, copying(prompt), chunks=3)
    batch.put(1, chunked)
    for _ in range(2):
        drafts = batch.step()
        assert drafts[1] == [] and drafts[2] == [] and drafts[0]
        assert proposer.stats()["requests_started"] == 1
    drafts = batch.step()  # its prefill ends
    assert len(drafts[1]) == K
    assert_correct(batch.log)


def test_drafting_stops_where_it_does_not_pay():
    """The prompt offers one continuation of every token, which the model never follows."""
    proposer = TrieProposer(config())
    batch = Batch(proposer, rows=1)
    prompt = permutation(6, range(200)) * 2
    req = Request(prompt, random_text(6, range(200)))
    batch.put(0, req)
    drafted = [len(batch.step()[0]) for _ in range(60)]
    assert drafted[0] >= 1  # the first lookup probes
    assert sum(drafted[20:]) == 0
    assert proposer.stats()["choices"]["drafts=0"] >= 40


def test_drafts_stop_at_max_model_len():
    proposer = TrieProposer(config())
    batch = Batch(proposer, rows=1, max_len=48)
    prompt = permutation(8, range(40))
    batch.put(0, Request(prompt, copying(prompt), max_new=8))
    lengths = []
    for _ in range(4):
        d = batch.step()[0]
        lengths.append((int(batch.counts[0]), len(d)))
    assert all(n + d <= 48 for n, d in lengths)
    assert_correct(batch.log)


def test_bad_configuration():
    with pytest.raises(ValueError, match=r"num_speculative_tokens must be in \[1, .*found 0"):
        TrieProposer(config(k=0))
    with pytest.raises(TypeError, match="num_speculative_tokens must be an int, found str"):
        TrieProposer(config(k="8"))
    with pytest.raises(ValueError, match="num_speculative_tokens is missing"):
        TrieProposer(SimpleNamespace(model_config=config().model_config))
    with pytest.raises(TypeError, match=r"get_vocab_size\(\) must be an int, found float"):
        TrieProposer(config(vocab=32000.0))
    with pytest.raises(ValueError, match="no vocabulary size"):
        TrieProposer(SimpleNamespace(speculative_config=config().speculative_config,
                                     model_config=SimpleNamespace(hf_config=SimpleNamespace())))
    with pytest.raises(ValueError, match="max_num_seqs must be in"):
        TrieProposer(config(max_num_seqs=0))
    hf_config = SimpleNamespace(vocab_size=77)
    hf_only = SimpleNamespace(speculative_config=config().speculative_config,
                              model_config=SimpleNamespace(hf_config=hf_config))
    assert TrieProposer(hf_only).vocab_size == 77


def test_token_cost_setting(monkeypatch):
    assert TrieProposer(config()).token_cost == TrieProposer.TOKEN_COST
    monkeypatch.setenv(TOKEN_COST_ENV, "0.5")
    assert TrieProposer(config()).token_cost == 0.5
    monkeypatch.setenv(TOKEN_COST_ENV, "cheap")
    with pytest.raises(ValueError, match=f"{TOKEN_COST_ENV} must be a number >= 0, found 'cheap'"):
        TrieProposer(config())
    monkeypatch.setenv(TOKEN_COST_ENV, "-1")
    with pytest.raises(ValueError, match=f"{TOKEN_COST_ENV} must be a finite number >= 0"):
        TrieProposer(config())


@pytest.mark.parametrize("per_draft, drafts", [(0.0002, "most"), (0.03, "none")])
def test_draft_length_follows_the_engines_step_times(per_draft, drafts):
    """The engine's steps take 10 ms plus ``per_draft`` per draft token: on copying text,
    drafting pays where a draft token is cheap and stops once the fit prices it above what an
    accepted token brings (30 ms a token: three plain steps)."""
    clock = [0.0]
    proposer = TrieProposer(config())
    proposer.costs = EngineStepCosts(clock=lambda: clock[0])
    batch = Batch(proposer, rows=2, max_len=2048)
    for row in range(2):
        prompt = permutation(row, range(100 * row, 100 * row + 40))
        batch.put(row, Request(prompt, copying(prompt), max_new=10**6))
    given = []
    for _ in range(80):
        out = batch.step()
        given.append(sum(len(d) for d in out))
        clock[0] += 0.010 + per_draft * given[-1]
    assert proposer.costs.fit is not None
    assert_correct(batch.log)
    if drafts == "most":
        assert sum(given[-30:]) >= 0.9 * 30 * 2 * K
    else:
        assert sum(given[-30:]) == 0


def test_methods_to_run():
    from fastdecode.integrations.vllm_driver import methods_to_run

    assert methods_to_run("none,ngram4,fastdecode") == ["none", "ngram4", "fastdecode"]
    with pytest.raises(ValueError, match="methods must include none"):
        methods_to_run("ngram4,fastdecode")
    with pytest.raises(ValueError, match="found 'none,medusa'"):
        methods_to_run("none,medusa")


class TableCosts(EngineStepCosts):
    """Step seconds from a function of (rows, drafts), for the batch's draft choice alone."""

    def __init__(self, seconds) -> None:
        super().__init__()
        self._table = seconds

    def seconds(self, rows: int, drafts: int) -> float:
        return self._table(rows, drafts)

    def explore(self) -> bool:
        return False


def test_the_batch_drafts_its_best_gains_at_the_best_expected_rate():
    proposer = TrieProposer(config())
    proposer.costs = TableCosts(lambda rows, drafts: rows + 0.3 * drafts)
    # rates (rows + gains) / cost for D = 0..5: 1.0 (x1.05 to beat), 1.26, 1.42, 1.52, 1.44, 1.34
    assert proposer._lengths([[0.9, 0.8, 0.2], [0.7, 0.1]]) == [2, 1]
    assert proposer._lengths([[0.04, 0.03], [], [0.02]]) == [0, 0, 0]  # nothing pays
    assert proposer._lengths([]) == []
    # an engine whose one-row step feeding 4 tokens is cheaper than feeding 1 (vLLM's CPU
    # engine was measured so): even unlikely drafts pay there
    cheap4 = {0: 0.050, 1: 0.060, 2: 0.047, 3: 0.044, 4: 0.050}
    proposer.costs = TableCosts(lambda rows, drafts: cheap4[drafts])
    assert proposer._lengths([[0.05, 0.04, 0.03, 0.02]]) == [3]


def test_every_scored_chain_teaches_its_cells():
    """Chains drafted after a 3-token match whose first 2 drafts agreed with what came next:
    each tried draft (the agreeing ones and the first that disagreed) counts in its (context
    length, count-ratio bin, position) cell, older outcomes weighing CALIBRATION_DECAY less."""
    from fastdecode.integrations.vllm import _Lookup

    proposer = TrieProposer(config())
    row = np.array([7, 8, 9, 1, 2, 9, 1, 2, 9], dtype=np.int32)
    req = proposer._start(row, 3, 1)
    # ratios 1, 0.5, 1, 0.5 (bins 5, 2, 5, 2), then 1, 1, 1, 1
    for n, chances in ((6, [1.0, 0.5, 0.5, 0.25]), (9, [1.0, 1.0, 1.0, 1.0])):
        req.pending.append(_Lookup([1, 2, 3, 4], chances, 3, sum(chances)))
        req = proposer._update(req, row, n)
        assert not req.pending
    d = TrieProposer.CALIBRATION_DECAY
    expect = {(2, 5, 0): (1 + d, 1 + d), (2, 2, 1): (1, 1), (2, 5, 1): (1, 1),
              (2, 5, 2): (0, 1 + d)}
    for cell, (agreed, scored) in expect.items():
        assert (proposer._agreed[cell], proposer._scored[cell]) == pytest.approx((agreed, scored))
    assert proposer._scored.sum() == pytest.approx(sum(s for _, s in expect.values()))
    assert proposer._agreed.sum() == pytest.approx(sum(a for a, _ in expect.values()))


def test_cells_that_agree_more_than_their_ratios_raise_the_gains():
    """Rare continuations (count ratio 0.3) that kept coming true: the drafts' calibrated
    chance moves from the ratio toward what the cell saw; a cell never seen keeps the ratio."""
    proposer = TrieProposer(config())
    for _ in range(40):
        cells, _ = proposer._cells(2, [0.3])
        for cell in zip(*cells):
            proposer._agreed[cell] += 1.0
            proposer._scored[cell] += 1.0
    cells, ratios = proposer._cells(2, [0.3, 0.3 * 0.3])
    agree = (proposer._agreed[cells] + proposer.CALIBRATION_PRIOR * ratios) / (
        proposer._scored[cells] + proposer.CALIBRATION_PRIOR)
    assert agree[0] == pytest.approx((40 + 4 * 0.3) / 44)  # the learned cell
    assert agree[1] == pytest.approx(0.3)  # position 2: no outcomes yet
    assert ratios.tolist() == pytest.approx([0.3, 0.3])


def test_gains_never_rise_along_a_chain(monkeypatch):
    """Cells where later drafts always agreed cannot lift a draft's gain above the one before
    it (a draft is accepted only after all before it)."""
    proposer = TrieProposer(config())
    seen = []
    lengths = proposer._lengths
    monkeypatch.setattr(proposer, "_lengths", lambda gains: seen.extend(gains) or lengths(gains))
    batch = Batch(proposer, rows=1)
    prompt = permutation(3, range(60))
    batch.put(0, Request(prompt, copying(prompt)))
    proposer._scored[...] = 50.0
    proposer._agreed[:, :, 1:] = 50.0  # later positions always agreed, first ones never
    for _ in range(6):
        batch.step()
    chains = [g for g in seen if len(g) > 1]
    assert chains and all(a >= b for g in chains for a, b in zip(g, g[1:]))
    assert_correct(batch.log)
