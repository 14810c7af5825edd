"""The step budget of ``config="auto"``: the runner's measured step costs
(fastdecode.decoding.step_costs), the loop's budget chooser (fastdecode.decoding.budget), and
what the loop hands drafters."""

from __future__ import annotations

import gc

import pytest
import torch
from test_generate import prompts, tiny

import fastdecode
from fastdecode.decoding.auto_jacobi import AutoJacobi
from fastdecode.decoding.budget import MARGIN, BudgetChooser, Option, nearly_free
from fastdecode.decoding.drafter import Draft, History, NoDraft
from fastdecode.decoding.loop import decode
from fastdecode.decoding.sampling import SamplingConfig
from fastdecode.decoding import step_costs
from fastdecode.hf.model import TreeRunner
from fastdecode.decoding.step_costs import SAMPLES, StepCosts, bucket_of, costs_of, interpolate


def test_bucket_and_interpolation():
    assert [bucket_of(n) for n in (0, 1, 2, 3, 4, 255, 256)] == [1, 1, 2, 2, 3, 8, 9]
    curve = [(1, 1.0), (2, 2.0), (4, 3.0)]
    assert interpolate(curve, 1) == 1.0 and interpolate(curve, 3) == 2.5
    assert interpolate(curve, 6) == 4.0  # along the last two points


def test_costs_are_medians_of_recent_steps():
    costs = StepCosts()
    assert not costs.measured() and costs.curve(100) == []
    costs.add(100, 8, 2.0)  # before any single-token forward: dropped
    for s in (1.0, 1.0, 1.0, 50.0):  # one step slowed by another job
        costs.add(100, 1, s)
    assert not costs.measured()  # no larger forward timed yet
    costs.add(100, 8, 2.0)
    assert costs.measured()
    assert costs.curve(100) == [(1, 1.0), (8, 2.0)]
    for _ in range(SAMPLES):  # a lasting slow-down, seen by the single-token steps
        costs.add(100, 1, 3.0)
    assert costs.curve(100) == [(1, 3.0), (8, 6.0)]  # moves the whole curve
    assert costs.median(100, 8) == 6.0 and costs.median(100, 4) is None
    assert costs.median(5000, 1) is None


def test_a_new_bucket_uses_its_own_single_token_cost_and_the_nearest_ratios():
    costs = StepCosts()
    costs.add(100, 1, 1.0)  # bucket 7
    costs.add(100, 16, 4.0)
    costs.add(3000, 1, 2.0)  # bucket 12: no 16-token forward timed there
    costs.add(3000, 2, 3.0)
    assert costs.curve(3000) == [(1, 2.0), (2, 3.0), (16, 8.0)]
    assert costs.curve(100) == [(1, 1.0), (2, 1.5), (16, 4.0)]
    assert costs.curve(1 << 20) == costs.curve(3000)  # the nearest bucket's


def test_costs_are_kept_per_model_by_weak_reference():
    a, b = tiny("llama", seed=1), tiny("llama", seed=1)
    assert costs_of(a, torch.device("cpu"), torch.float32) is costs_of(a, torch.device("cpu"),
                                                                       torch.float32)
    assert costs_of(a, torch.device("cpu"), torch.float32) is not costs_of(
        b, torch.device("cpu"), torch.float32)
    assert costs_of(a, torch.device("cpu"), torch.float32) is not costs_of(
        a, torch.device("cpu"), torch.float64)
    before = len(step_costs._BOOK)
    del a
    gc.collect()
    assert len(step_costs._BOOK) == before - 1


def test_chooser_takes_plain_decoding_unless_drafting_pays_by_the_margin():
    curve = [(1, 1.0), (8, 2.0)]
    chooser = BudgetChooser()
    plain = Option("plain", "plain", 1.0, 1)
    assert chooser.choose(curve, [plain, Option("d", "d", 2.0, 8)]) == "plain"  # equal rates
    assert chooser.choose(curve, [plain, Option("d", "d", 2.0 * MARGIN + 0.01, 8)]) == "d"
    assert chooser.choose(curve, [plain, Option("a", "a", 3.0, 8),
                                  Option("b", "b", 2.5, 4)]) == "b"  # 2.5 / 1.43 > 3 / 2
    assert chooser.choose(curve, [Option("only", "only", 1.0, 8)]) == "only"
    assert chooser.stats() == {"choices": {"b": 1, "d": 1, "only": 1, "plain": 1},
                               "cost_s": {1: 1.0, 8: 2.0}}
    assert nearly_free([(1, 1.0), (64, 1.1)], 64) and not nearly_free(curve, 8)


def test_the_runner_refines_its_costs_from_the_real_steps():
    model = tiny("llama", seed=2)
    ids, mask = prompts(2, 12, seed=1, pad_rows={1: 4})
    out = fastdecode.generate(model, ids, attention_mask=mask, strategy="trie", config="auto",
                              max_new_tokens=30, eos_token_id=[])
    costs = costs_of(model, torch.device("cpu"), model.dtype)
    timed = {1} | {t for by_t in costs._ratios.values() for t in by_t}
    assert set(step_costs.PROBE_TOKENS) <= timed
    steps = sum(map(len, costs._single.values())) + sum(
        len(r) for by_t in costs._ratios.values() for r in by_t.values())
    assert steps >= min(out.stats.steps - 1, SAMPLES)  # the tree forwards (not the prefill)
    assert set(out.stats.drafter["auto"]["cost_s"]) >= set(step_costs.PROBE_TOKENS)


class Recorder(NoDraft):
    """Plain decoding that checks every step's host copy of the new tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[list[list[int]]] = []

    def start(self, history: History) -> None:
        super().start(history)
        self._check(history)

    def observe(self, draft: Draft, logits: torch.Tensor, result, history: History) -> None:
        self._check(history)

    def _check(self, history: History) -> None:
        want = [row[s:e] for row, s, e in zip(history.tokens.tolist(), history.new_from.tolist(),
                                               history.end.tolist())]
        assert history.new == want
        self.seen.append(history.new)


@pytest.mark.parametrize("eos", [[], [7]])
def test_history_holds_each_steps_new_tokens_on_the_host(eos):
    model = tiny("llama", seed=5)
    ids, mask = prompts(3, 10, seed=2, pad_rows={2: 3})
    recorder = Recorder()
    seq, _ = decode(TreeRunner(model), recorder, ids, mask, max_new_tokens=9, eos_ids=eos,
                    pad_id=0, sampling=SamplingConfig(do_sample=False))
    for b in range(3):
        new = seq[b, ids.shape[1]:].tolist()
        emitted = new.index(7) + 1 if eos and 7 in new else 9
        assert [t for step in recorder.seen for t in step[b]] == new[:emitted]


class WatchedJacobi(AutoJacobi):
    """AutoJacobi that logs every step's lookup (candidates, counts, each row's length before
    the step's tokens, whether the row got tokens) for an offline recount of its scores."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.log: list[tuple] = []

    def observe(self, draft, logits, result, history: History) -> None:
        self.log.append((self.candidates.tolist(), self.count.tolist(),
                         [len(r) for r in self.rows], [bool(n) for n in history.new]))
        super().observe(draft, logits, result, history)


def recount(drafter: WatchedJacobi) -> tuple[list[list[int]], int, int]:
    """The score table, the scored lookups and the lookups still open, counted from the log
    and the rows' final tokens."""
    K, G = drafter.N - 1, drafter.G
    score, scored, open_ = [[0] * drafter.N for _ in range(G + 1)], 0, 0
    for cands, counts, lengths, running in drafter.log:
        for b in range(len(lengths)):
            if not running[b]:
                continue
            x = lengths[b] - 1
            real = drafter.rows[b][x + 1: x + 1 + K]
            matched = []
            for cand in cands[b][: counts[b]]:
                m = 0
                while m < len(real) and cand[m] == real[m]:
                    m += 1
                matched.append(m)
            if len(real) < K and max(matched, default=0) == len(real):
                open_ += 1
                continue
            for g in range(1, G + 1):
                best = max(matched[:g], default=0)
                for k in range(1, drafter.N):
                    score[g][k] += min(best, k)
            scored += 1
    return score, scored, open_


def test_auto_jacobi_scores_every_running_rows_lookup_once():
    """The incremental scoring (lookups with no candidate at all scored at once, finished rows
    dropped) equals an offline recount over every step's logged lookup."""
    model = tiny("llama", seed=3)
    ids, mask = prompts(3, 14, seed=4, pad_rows={1: 3})
    plain, _ = decode(TreeRunner(model), NoDraft(), ids, mask, max_new_tokens=24, eos_ids=[],
                      pad_id=0, sampling=SamplingConfig(do_sample=False))
    row0 = plain[0, ids.shape[1]:].tolist()
    others = plain[1:, ids.shape[1]:].flatten().tolist()
    eos = next(t for t in row0[2:] if t not in others)  # row 0 stops early, the others run
    drafter = WatchedJacobi(model.config.vocab_size, 3, 4, 3)
    seq, stats = decode(TreeRunner(model), drafter, ids, mask, max_new_tokens=24, eos_ids=[eos],
                        pad_id=0, sampling=SamplingConfig(do_sample=False))
    assert (seq[0] == 0).any() and stats.steps > 3  # row 0 finished before the others
    score, scored, open_ = recount(drafter)
    assert drafter.score == score and drafter.scored == scored
    assert len(drafter.pending) == open_ < 3 * (drafter.N - 1)
    assert any(not all(r) for *_, r in drafter.log)  # steps ran with a finished row
