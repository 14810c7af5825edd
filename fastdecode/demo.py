"""``make demo`` / ``fastdecode demo``: the default model (SmolLM2-135M-Instruct) decodes the
built-in prompt set (:mod:`fastdecode.models.prompts`) greedily and with Jacobi lookahead on
``config="auto"``, and a table per prompt category tells what lookahead gained: tokens per
second, tokens accepted per step, the speedup over greedy, and whether the output is identical.

``fastdecode demo --primitives`` instead works one verification step of tree decoding by hand:
the "model's" predictions are written out, so that every number the primitives print can be
checked by eye.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from dataclasses import dataclass
from typing import TextIO

import torch

from fastdecode import _backend
from fastdecode.ops import compact_kv, pack_tree_mask, tree_mask, tree_positions, verify_tree

# ---- the primitives, worked by hand (--primitives) -------------------------------------------

WORDS = ["<pad>", "the", "cat", "sat", "on", "mat", "in", "a", "hat", "ran", "away", "box"]
ID = {w: i for i, w in enumerate(WORDS)}

# A draft tree rooted at the last accepted token "cat" (node 0), three branches:
#   cat -> sat -> on -> the      (nodes 1, 2, 3)
#          sat -> in             (node 4)
#   cat -> ran -> away           (nodes 5, 6)
# Row 1 holds the same shape of tree with other words and one padding node.
TREES = [
    (["cat", "sat", "on", "the", "in", "ran", "away"], [-1, 0, 1, 2, 1, 0, 5]),
    (["cat", "in", "a", "box", "ran", "<pad>", "<pad>"], [-1, 0, 1, 2, 0, -2, -2]),
]
# What the model emits after each node (argmax of its logits at that node).
PREDICTED = [
    ["ran", "on", "a", "mat", "a", "away", "in"],
    ["in", "a", "hat", "the", "away", "<pad>", "<pad>"],
]
PREFIX = [12, 9]  # tokens already in each row's KV cache; node 0 sits at position PREFIX


def _words(ids: list[int]) -> str:
    return " ".join(WORDS[i] if i >= 0 else "." for i in ids)


def run_primitives(device: str = "cpu") -> None:
    """Prints what each primitive does on the worked example."""
    draft = torch.tensor([[ID[w] for w in row] for row, _ in TREES], device=device)
    parents = torch.tensor([p for _, p in TREES], device=device)
    predicted = torch.tensor([[ID[w] for w in row] for row in PREDICTED], device=device)
    B, T = draft.shape
    dev = torch.device(device)
    print(f"fastdecode primitives on a worked example ({B} rows, T={T} draft nodes, {device})\n")
    for b in range(B):
        print(f"row {b}: draft tree tokens  {_words(draft[b].tolist())}")
        print(f"       parents            {parents[b].tolist()}  (-1 root, -2 padding)")
        print(f"       model predicts     {_words(predicted[b].tolist())}  (after each node)")

    res = verify_tree(draft, parents, predicted)
    print(f"\nverify_tree  [{_backend.select('verify_tree', dev)[0]} backend]: "
          "a node is accepted when its parent is and its token is what the model "
          "predicted after its parent")
    for b in range(B):
        n = int(res.accept_len[b])
        print(f"  row {b}: accept_len={n} best_node={int(res.best_node[b])} "
              f"path={res.path[b].tolist()} -> append '{_words(res.tokens[b, :n + 1].tolist())}' "
              f"({n} drafted + 1 bonus token)")

    mask = tree_mask(parents)
    print(f"\ntree_mask  [{_backend.select('tree_mask', dev)[0]} backend]: "
          "row i may attend to column j when j is i or an ancestor of i (row 0 shown)")
    for i in range(T):
        print("  " + " ".join("x" if v else "." for v in mask[0, i].tolist()) + f"   node {i}")
    packed = pack_tree_mask(mask)
    print(f"\npack_tree_mask  [{_backend.select('pack_tree_mask', dev)[0]} backend]: "
          f"32 columns per int32 word (bit j = column j), shape {tuple(packed.shape)}; row 0: "
          + ", ".join(f"0b{int(w):07b}" for w in packed[0, :, 0].tolist()))

    positions = tree_positions(parents, torch.tensor(PREFIX, device=device))
    print(f"\ntree_positions  [{_backend.select('tree_positions', dev)[0]} backend]: "
          "prefix length + depth, per row")
    for b in range(B):
        print(f"  row {b} (prefix {PREFIX[b]}): {positions[b].tolist()}")

    S, H, D = max(PREFIX) + T, 1, 1
    rows = torch.arange(S, dtype=torch.float32, device=device)
    cache = rows.repeat(B, H, 1)[..., None].expand(B, H, S, D).contiguous()  # row s holds s
    start = torch.tensor(PREFIX, device=device)
    compact_kv([cache], start, res.path, res.accept_len + 1)
    print(f"\ncompact_kv  [{_backend.select('compact_kv', dev)[0]} backend]: the accepted "
          "path's KV rows move, in place, right after the prefix (each cache row s held s)")
    for b in range(B):
        n = int(res.accept_len[b]) + 1
        moved = cache[b, 0, PREFIX[b]:PREFIX[b] + n, 0].long().tolist()
        print(f"  row {b}: rows {PREFIX[b]}..{PREFIX[b] + n - 1} now hold {moved}; "
              f"crop the cache to {PREFIX[b] + n} rows next")


# ---- the default model on the built-in prompt set (the default) ------------------------------

# (label, strategy, config) of the decodings compared, the baseline first.
DECODINGS = (("greedy", "greedy", None), ("auto", "jacobi", "auto"))


class ProgressBar:
    """A one-line progress bar counting generated tokens against the budget of every call, and
    the ``streamer`` (``put``/``end``) of each call.

    ``begin(label, budget)`` starts a call; every token it streams advances the bar by one, and
    ``end`` counts the budget a call left unused (it stopped at EOS) as done. On a terminal the
    line is redrawn in place, at most ten times a second; elsewhere a line is written per call.
    """

    def __init__(self, total: int, stream: TextIO | None = None, width: int = 28) -> None:
        self.total, self.width = total, width
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty()
        self.done = self.budget = self.produced = 0
        self.label = ""
        self.t0 = time.perf_counter()
        self.drawn = 0.0

    def begin(self, label: str, budget: int) -> None:
        """Starts a call of at most ``budget`` tokens, shown as ``label``."""
        self.label, self.budget, self.produced = label, budget, 0
        self._draw(force=True)

    def put(self, value: torch.Tensor) -> None:
        """Streamer interface: the prompts (2-D, skipped), then one token per row (1-D)."""
        if value.dim() == 1:
            self.produced += 1
            self.done += 1
            self._draw()

    def end(self) -> None:
        """Streamer interface: the call is over."""
        self.done += self.budget - self.produced
        self._draw(force=True, finished=True)

    def close(self) -> None:
        """Ends the bar's line on a terminal."""
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()

    def _draw(self, force: bool = False, finished: bool = False) -> None:
        """Writes the bar: on a terminal when forced or 0.1 s after the last drawing, elsewhere
        when a call finished."""
        now = time.perf_counter()
        if (self.tty and not force and now - self.drawn < 0.1) or (not self.tty and not finished):
            return
        self.drawn = now
        frac = self.done / self.total if self.total else 1.0
        fill = round(frac * self.width)
        minutes, seconds = divmod(int(now - self.t0), 60)
        line = (f"[{'#' * fill}{'.' * (self.width - fill)}] {frac:4.0%} {self.done}/{self.total} "
                f"tokens {minutes:02d}:{seconds:02d}  {self.label}")
        self.stream.write(f"\r{line}\x1b[K" if self.tty else line + "\n")
        self.stream.flush()


@dataclass
class Run:
    """One generate call of the demo: its output and what it took. ``auto`` is
    ``stats.drafter["auto"]`` (what ``config="auto"`` chose), None for greedy."""

    sequences: torch.Tensor
    new_tokens: int
    steps: int
    seconds: float
    auto: dict | None


def decode_once(model, input_ids: torch.Tensor, strategy: str, config: str | None,
                max_new_tokens: int, streamer: ProgressBar) -> Run:
    """One :func:`fastdecode.generate` call, timed on the wall clock around the whole call."""
    from fastdecode.decoding.generate import generate

    device = input_ids.device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    out = generate(model, input_ids, strategy=strategy, config=config,
                   max_new_tokens=max_new_tokens, streamer=streamer)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    return Run(out.sequences.cpu(), out.stats.new_tokens, out.stats.steps, seconds,
               out.stats.drafter.get("auto"))


def _rate(runs: list[Run]) -> float:
    """Tokens per second over all ``runs`` together."""
    seconds = sum(r.seconds for r in runs)
    return sum(r.new_tokens for r in runs) / seconds if seconds > 0 else 0.0


def _per_step(runs: list[Run]) -> float:
    """Tokens emitted per model forward (the prefill counted) over all ``runs`` together."""
    steps = sum(r.steps for r in runs)
    return sum(r.new_tokens for r in runs) / steps if steps else 0.0


def _identical(pairs: list[tuple[Run, Run]]) -> str:
    """'yes' when every pair's outputs are equal, else 'no' with the count that differ."""
    differ = sum(not torch.equal(a.sequences, b.sequences) for a, b in pairs)
    return "yes" if differ == 0 else f"no ({differ} of {len(pairs)})"


def _table_row(name: str, prompts: int, greedy: list[Run], auto: list[Run]) -> list[str]:
    """The report's cells for one category (or all of them)."""
    g, a = _rate(greedy), _rate(auto)
    return [name, str(prompts), str(sum(r.new_tokens for r in auto)), f"{g:.1f}", f"{a:.1f}",
            f"{a / g:.2f}x" if g > 0 else "-", f"{_per_step(auto):.2f}",
            _identical(list(zip(greedy, auto)))]


def _choices(auto: list[Run]) -> str:
    """What auto verified per step over ``auto`` runs: the most frequent (g, k) shares."""
    counts: Counter = Counter()
    for r in auto:
        counts.update(r.auto["choices"])
    steps = sum(counts.values())
    window = "on" if any(r.auto["window"] for r in auto) else "off"
    shares = ", ".join(f"{'plain' if key == 'g=0,k=0' else key} {n / steps:.0%}"
                       for key, n in counts.most_common(4)) if steps else "no drafted steps"
    return f"window {window}; {shares}"


def format_report(results: dict[str, list[tuple[Run, Run]]]) -> str:
    """The demo's tables: per category (and all together) greedy and auto tokens/s, the speedup,
    auto's tokens per step and whether the outputs are identical; then what auto chose."""
    header = ["category", "prompts", "tokens", "greedy tok/s", "auto tok/s", "speedup",
              "tokens/step", "identical"]
    rows = [_table_row(cat, len(pairs), [g for g, _ in pairs], [a for _, a in pairs])
            for cat, pairs in results.items()]
    every = [p for pairs in results.values() for p in pairs]
    rows.append(_table_row("all", len(every), [g for g, _ in every], [a for _, a in every]))
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i in (0, 7) else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    out = [line(header), line(["-" * w for w in widths])]
    out += [line(r) for r in rows[:-1]] + [line(["-" * w for w in widths]), line(rows[-1])]
    out += ["", "tokens/step: tokens emitted per model forward with auto (greedy: 1.00); "
            "speedup: auto tok/s over greedy tok/s;",
            "auto's seconds include its one-time cost probe (a few forwards, the first time the "
            "model is timed)", "",
            "what auto chose per step (g n-gram candidates of k tokens verified; plain = no "
            "draft):"]
    name_w = max(len(c) for c in results)
    out += [f"  {cat.ljust(name_w)}  {_choices([a for _, a in pairs])}"
            for cat, pairs in results.items()]
    costs = every[-1][1].auto["cost_s"]
    out.append("  forward cost it measured here (the last call's context, from its probe and "
               "real steps): " + ", ".join(f"{t} tok {s * 1e3:.0f} ms" for t, s in costs.items()))
    return "\n".join(out)


def run_demo(*, device: str | None = None, threads: int | None = None,
             max_new_tokens: int | None = None) -> None:
    """Decodes every built-in prompt with the default model, greedy then ``jacobi`` on
    ``config="auto"``, with a progress bar on stderr, and prints the report.

    Args:
        device: "cpu" or "cuda"; default: cuda when available.
        threads: torch's CPU threads; default: 1 on the CPU (a 135M model gains little from
            more, and one thread keeps the comparison steady on a shared machine), torch's
            own choice on a GPU.
        max_new_tokens: one budget for every prompt; default: the category's
            (:data:`fastdecode.models.prompts.MAX_NEW_TOKENS`).
    """
    from transformers.utils import logging as hf_logging

    from fastdecode.models import load_default
    from fastdecode.models.prompts import MAX_NEW_TOKENS, PROMPTS, chat_input_ids

    t_start = time.perf_counter()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if threads is None and device == "cpu":
        threads = 1
    if threads is not None:
        torch.set_num_threads(threads)
    where = (torch.cuda.get_device_name(device) if device.startswith("cuda")
             else f"cpu, {torch.get_num_threads()} torch thread"
             + ("s" if torch.get_num_threads() > 1 else ""))
    print(f"fastdecode demo: SmolLM2-135M-Instruct ({where}), {sum(map(len, PROMPTS.values()))} "
          "prompts, greedy and jacobi config='auto'", flush=True)
    print("loading the default model (its first use converts it, about half a minute) ...",
          file=sys.stderr, flush=True)
    hf_logging.disable_progress_bar()
    model, tokenizer = load_default(device=device)
    jobs = [(cat, i, len(prompts), chat_input_ids(tokenizer, p).to(device),
             max_new_tokens or MAX_NEW_TOKENS[cat])
            for cat, prompts in PROMPTS.items() for i, p in enumerate(prompts)]
    bar = ProgressBar(sum(budget for *_, budget in jobs) * len(DECODINGS))
    results: dict[str, list[tuple[Run, Run]]] = {}
    samples: dict[str, str] = {}
    for cat, i, n, ids, budget in jobs:
        runs = []
        for label, strategy, config in DECODINGS:
            bar.begin(f"{cat} {i + 1}/{n} {label}", budget)
            runs.append(decode_once(model, ids, strategy, config, budget, bar))
        results.setdefault(cat, []).append((runs[0], runs[1]))
        if i == 0:
            answer = tokenizer.decode(runs[1].sequences[0, ids.shape[1]:], skip_special_tokens=True)
            samples[cat] = " ".join(answer.split())
    bar.close()
    print()
    print(format_report(results))
    print("\nfirst answer of each category (auto):")
    width = max(len(c) for c in samples)
    for cat, text in samples.items():
        print(f"  {cat.ljust(width)}  {text[:96] + ' ...' if len(text) > 96 else text}")
    print(f"\ndemo wall time {time.perf_counter() - t_start:.0f} s (model load included)")
