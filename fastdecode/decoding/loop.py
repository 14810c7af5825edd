"""The one decoding loop every strategy runs: (for an adaptive drafter, choose the step's
budget), propose a draft tree, run it in one forward, choose each node's token, verify, commit
the accepted KV, let the drafter observe, stop.

Exactness: the emitted tokens of a step are the predictions along the accepted path, so greedy
decoding reproduces plain greedy decoding token for token, and sampling draws every emitted
token from the model's processed distribution given exactly the tokens before it.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

import torch

from fastdecode.decoding.budget import BudgetChooser
from fastdecode.decoding.drafter import AdaptiveDrafter, Drafter, History
from fastdecode.decoding.path_processors import PathProcessors
from fastdecode.decoding.sampling import SamplingConfig, choose_tokens, processed_logits
from fastdecode.decoding.token_outputs import StopCheck, TokenOutputs
from fastdecode.hf.model import TreeRunner
from fastdecode.ops import verify_tree


@dataclass
class GenerateStats:
    """What a generate call did.

    steps: model forwards, the prefill included. new_tokens: tokens emitted over all rows.
    mean_accepted: mean tokens emitted per (row, step) while the row was running, the prefill
    included. accepted_hist: {tokens emitted in one step by one row: how often}.
    forward_s: seconds in the model's forwards (an adaptive drafter's probe forwards of a
    model not timed before included); overhead_s: everything else of the call (the drafter,
    the budget choice, masks, verification, KV commits, bookkeeping). drafter: the drafter's
    counters (for jacobi: pool lookups that found candidates, steps that accepted pool tokens,
    ...), and for an adaptive drafter under "auto" what the budget chooser chose per step and
    the last cost curve it used.
    """

    steps: int = 0
    new_tokens: int = 0
    mean_accepted: float = 0.0
    accepted_hist: dict[int, int] = field(default_factory=dict)
    forward_s: float = 0.0
    overhead_s: float = 0.0
    drafter: dict = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        total = self.forward_s + self.overhead_s
        return self.new_tokens / total if total > 0 else 0.0


@torch.no_grad()
def decode(runner: TreeRunner, drafter: Drafter, input_ids: torch.Tensor,
           attention_mask: torch.Tensor, *, max_new_tokens: int, eos_ids: list[int],
           pad_id: int, sampling: SamplingConfig, generator: torch.Generator | None = None,
           streamer=None, processors: PathProcessors | None = None,
           stop: StopCheck | None = None, outputs: TokenOutputs | None = None,
           cache: object | None = None) -> tuple[torch.Tensor, GenerateStats]:
    """Decodes left-padded prompts ``input_ids [B, L]`` (``attention_mask`` 1 on real tokens).

    Returns ``sequences [B, L + n]`` (the prompts as given, then each row's new tokens, rows
    that stopped early padded with ``pad_id``; n is the longest row's count) and the stats.
    A row stops after an EOS token (kept) or ``max_new_tokens`` tokens. For an
    :class:`AdaptiveDrafter` every step's budget is chosen from its options on the runner's
    measured step costs (:class:`~fastdecode.decoding.budget.BudgetChooser`). ``processors``
    process every node's logits along its own path before tokens are chosen (see
    :mod:`fastdecode.decoding.path_processors`); drafters observe the model's raw logits.
    ``stop`` ends a row after the first token it accepts (the token is kept); ``outputs``
    collects every emitted token's scores and logits (see
    :mod:`fastdecode.decoding.token_outputs`). ``cache``: an earlier call's KV cache that
    already holds a prefix of the one row (see :meth:`TreeRunner.prefill`).
    """
    t_call = time.perf_counter()
    device = input_ids.device
    B, L = input_ids.shape
    chooser = BudgetChooser() if isinstance(drafter, AdaptiveDrafter) else None
    rules = processors if processors is not None and processors.active else None
    per_token = stop is not None or outputs is not None

    def warped(scores: torch.Tensor) -> torch.Tensor:
        """What a token is drawn from: the processed scores, warped when sampling (the
        scores transformers reports)."""
        return processed_logits(scores, sampling) if sampling.do_sample else scores.float()
    stats = GenerateStats()
    hist: Counter = Counter()
    seq = torch.full((B, L + max_new_tokens + 1), pad_id, dtype=torch.int64, device=device)
    seq[:, :L] = input_ids
    produced = [0] * B
    done = [max_new_tokens == 0] * B
    eos = set(eos_ids)
    if streamer is not None:
        streamer.put(input_ids.cpu())

    streamed = 0

    def stream(final: bool = False) -> None:
        """Puts every output column that all rows have reached (finished rows hold pad), so
        the streamer sees exactly the columns of ``sequences``, in order."""
        nonlocal streamed
        if streamer is None:
            return
        running = [p for p, d in zip(produced, done) if not d]
        ready = max(produced, default=0) if final or not running else min(running)
        for i in range(streamed, ready):
            streamer.put(seq[:, L + i].cpu())
        streamed = max(streamed, ready)

    scratch = seq.shape[1] - 1  # a column past every output, for writes that are dropped

    def emit(rows: list[list[int]], tokens: torch.Tensor, nodes: list[list[int]] | None = None,
             logits: torch.Tensor | None = None, scores: torch.Tensor | None = None) -> History:
        """Appends each running row's tokens (``rows`` on the host, the same ``tokens [B, W]``
        on the device) up to EOS, the budget or ``stop``, with one host-to-device copy.
        ``nodes[b][i]``: the tree node whose ``logits``/``scores [B, T, V]`` chose row b's
        i-th token (needed with ``stop`` or ``outputs``). Returns the history with this
        step's tokens."""
        before, counts, kept = [], [], []
        for b, toks in enumerate(rows):
            take = [] if done[b] else toks[: max_new_tokens - produced[b]]
            for i, t in enumerate(take):
                if t in eos:
                    take = take[: i + 1]
                    break
            stopped = False
            if stop is not None:
                for i in range(len(take)):
                    ids = torch.cat([seq[b, : L + produced[b]],
                                     torch.tensor(take[: i + 1], device=device)])
                    if stop(ids[None], scores[b, nodes[b][i]][None]):
                        take, stopped = take[: i + 1], True
                        break
            if outputs is not None:
                for i in range(len(take)):
                    outputs.add(b, scores[b, nodes[b][i]], logits[b, nodes[b][i]])
            before.append(L + produced[b])
            counts.append(len(take))
            kept.append(take)
            if not done[b]:
                produced[b] += len(take)
                done[b] = (stopped or produced[b] >= max_new_tokens
                           or (bool(take) and take[-1] in eos))
                hist[len(take)] += 1
        meta = torch.tensor([before, counts], device=device)
        width = torch.arange(tokens.shape[1], device=device)
        cols = torch.where(width < meta[1, :, None], meta[0, :, None] + width, scratch)
        seq.scatter_(1, cols, tokens)
        stream()
        return History(seq, runner.kv_start, meta[0], meta[0] + meta[1], kept)

    if max_new_tokens > 0:
        logits = runner.prefill(input_ids, attention_mask, cache)[:, None]
        stats.steps = 1
        scores = logits if rules is None else rules.apply(
            logits, seq, runner.kv_start, torch.full((B,), L, device=device), produced)
        last = choose_tokens(scores, sampling, generator)[:, 0]
        first = emit([[t] for t in last.tolist()], last[:, None], [[0]] * B, logits,
                     warped(scores) if per_token else None)
        end = first.end
        drafter.start(first._replace(new_from=torch.full_like(first.end, L)))
    while not all(done):
        budget = None
        if chooser is not None:
            curve = runner.step_costs(last[:, None])
            budget = chooser.choose(curve, drafter.options(curve))
        draft = drafter.propose(last, budget)
        logits = runner.forward(draft.tokens, draft.parents)
        stats.steps += 1
        scores = logits if rules is None else rules.apply(logits, seq, runner.kv_start, end,
                                                            produced, draft.tokens, draft.parents)
        predicted = choose_tokens(scores, sampling, generator)
        result = verify_tree(draft.tokens, draft.verify_parents, predicted,
                             max_depth=draft.max_depth, validate=False)
        count = result.accept_len + 1
        parts = [count[:, None], result.tokens] + ([result.path] if per_token else [])
        host = torch.cat(parts, dim=1).tolist()  # the step's one sync
        lengths = [row[0] for row in host]
        width = result.tokens.shape[1]
        nodes = [row[1 + width: 1 + width + n] for row, n in zip(host, lengths)] \
            if per_token else None
        history = emit([row[1: 1 + n] for row, n in zip(host, lengths)], result.tokens, nodes,
                       logits, warped(scores) if per_token else None)
        end = history.end
        runner.commit(result.path, count, lengths)
        last = result.tokens.gather(1, result.accept_len[:, None])[:, 0]
        drafter.observe(draft, logits, result, history)
    if max_new_tokens > 0:
        drafter.finish()
    if streamer is not None:
        stream(final=True)
        streamer.end()

    stats.new_tokens = sum(produced)
    stats.accepted_hist = dict(sorted(hist.items()))
    runs = sum(hist.values())
    stats.mean_accepted = sum(k * v for k, v in hist.items()) / runs if runs else 0.0
    stats.forward_s = runner.forward_s
    stats.overhead_s = time.perf_counter() - t_call - stats.forward_s
    stats.drafter = drafter.stats()
    if chooser is not None:
        stats.drafter["auto"] = {**stats.drafter.get("auto", {}), **chooser.stats()}
    return seq[:, : L + max(produced, default=0)], stats
