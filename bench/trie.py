"""Benchmark of the trie of trie-based lookahead decoding (fastdecode.decoding.TrieCache, C++ on
the host CPU) at its default budget of 2^20 nodes.

The trie is filled to its budget (and past it, so eviction is running) with "generated text"
from a fixed random Markov chain over 2,000 of 32,000 token ids (3 successors per token, with
probabilities 0.6 / 0.3 / 0.1), inserted as output in chunks of 512 tokens. The timed contexts
are 1,024 bigrams of that text whose 64-node draft tree is full (T = 64), visited round-robin,
so every call walks a different part of the trie (cache misses included). Timed:

  * retrieve through the Python API (tensors in and out), hier and parallel modes, and for a
    request that also holds a 4,096-token prompt;
  * the native retrieval alone: one context repeated (warm caches) and the per-row cost of
    retrieve_batch over the 1,024 contexts (one native loop, distinct contexts);
  * insertion: 16 accepted tokens (one decoding step's output), and a 2,048-token prompt
    followed by end_request;
  * to_bytes / from_bytes of the full trie (single runs).
With --device cuda the same CPU trie is timed on the GPU machine, plus the copy of each
retrieved tree to the GPU.

Usage: python bench/trie.py [--device cpu|cuda] [--out DIR] [--quick] [--nodes N]
Writes trie.json and trie.md into DIR (default bench/results/<device slug>/), and also into
$OUT when that is set and --out is not given.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import os
import statistics
import time
from dataclasses import asdict
from typing import Callable

import numpy as np
import torch

import fastdecode
from fastdecode.decoding import TrieCache

import _report
from _report import RESULTS, cpu_name, device_name, device_slug, fmt_us
from _timing import Plan, measure

VOCAB = 32000
STATES, SUCCESSORS, PROBS = 2000, 3, (0.6, 0.3, 0.1)
TREE_NODES, BRANCH = 64, 12
N_CONTEXTS = 1024
GOAL = "retrieval of a 64-node tree in under 20 µs (Python API, distinct contexts) at 2^20 nodes"
GOAL_US = 20.0


class Corpus:
    """An endless token stream from a fixed random Markov chain (see the module doc)."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.ids = self.rng.choice(VOCAB, STATES, replace=False).astype(np.int64)
        self.next = self.rng.integers(0, STATES, (STATES, SUCCESSORS))
        self.state = 0

    def take(self, n: int) -> np.ndarray:
        choice = self.rng.choice(SUCCESSORS, n, p=PROBS)
        out = np.empty(n, dtype=np.int64)
        s, nxt = self.state, self.next
        for i in range(n):
            s = nxt[s, choice[i]]
            out[i] = s
        self.state = s
        return self.ids[out]


def fill(trie: TrieCache, corpus: Corpus, overshoot: float = 0.1) -> dict:
    """Inserts 512-token chunks until the trie is at its budget, then ``overshoot`` times as
    many tokens again (eviction running). Returns the text and build facts."""
    chunks, t0 = [], time.perf_counter()
    while trie.num_nodes < trie.max_nodes_total:
        chunks.append(torch.from_numpy(corpus.take(512)))
        trie.insert(chunks[-1], source="shared")
    for _ in range(max(1, int(len(chunks) * overshoot))):
        chunks.append(torch.from_numpy(corpus.take(512)))
        trie.insert(chunks[-1], source="shared")
    seconds = time.perf_counter() - t0
    stats = trie.stats()
    return {"text": torch.cat(chunks), "seconds": seconds, "tokens": 512 * len(chunks),
            "windows_per_s": stats["windows"] / seconds, **stats}


def full_tree_contexts(trie: TrieCache, text: torch.Tensor, seed: int = 1,
                       request_id: int | None = None) -> tuple[list[torch.Tensor], dict]:
    """Up to N_CONTEXTS bigrams of ``text`` whose tree is full, and the tree-size statistics of
    the sampled bigrams."""
    gen = torch.Generator().manual_seed(seed)
    positions = torch.randint(2, len(text), (4 * N_CONTEXTS,), generator=gen).tolist()
    sizes, full = [], []
    for p in positions:
        ctx = text[p - 2:p].clone()
        T = len(trie.retrieve(ctx, max_nodes=TREE_NODES, max_depth=BRANCH,
                              request_id=request_id)[0])
        sizes.append(T)
        if T == TREE_NODES and len(full) < N_CONTEXTS:
            full.append(ctx)
    facts = {"sampled": len(sizes), "mean_T": statistics.fmean(sizes),
             "full_fraction": sum(s == TREE_NODES for s in sizes) / len(sizes),
             "contexts": len(full)}
    return full, facts


def host_clock(fn: Callable[[], object], n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return time.perf_counter() - t0


def row(name: str, what: str, us: float, min_us: float, **extra) -> dict:
    return {"name": name, "what": what, "median_us": us, "min_us": min_us, **extra}


def timed(name: str, what: str, fn: Callable[[], object], plan: Plan, per: int = 1, **extra
          ) -> dict:
    t = measure(fn, host_clock, plan)
    r = row(name, what, t.median_us / per, t.min_us / per, repeats=t.repeats, iters=t.iters,
            **extra)
    print(f"{name:<34} {fmt_us(r['median_us']):>9} µs  ({what})", flush=True)
    return r


def run(args: argparse.Namespace, device: torch.device, plan: Plan) -> dict:
    corpus = Corpus()
    trie = TrieCache(VOCAB, decoding_length=TREE_NODES, branch_length=BRANCH,
                     max_nodes_total=args.nodes)
    built = fill(trie, corpus)
    text = built.pop("text")
    print(f"built {built['nodes']:,} nodes in {built['seconds']:.2f} s "
          f"({built['windows_per_s']:,.0f} windows/s)", flush=True)
    contexts, trees = full_tree_contexts(trie, text)
    print(f"contexts: {trees['contexts']} with T = {TREE_NODES}; sampled mean T "
          f"{trees['mean_T']:.1f}, {100 * trees['full_fraction']:.0f}% full", flush=True)
    rows = []

    # Retrieval through the Python API, round-robin over distinct contexts.
    for mode in ("hier", "parallel"):
        it = itertools.cycle(contexts)
        rows.append(timed(f"retrieve {mode}", "Python API, distinct contexts",
                          lambda it=it, mode=mode: trie.retrieve(next(it), mode=mode), plan,
                          goal=mode == "hier"))

    # Native retrieval alone.
    ctx = contexts[0]
    t = measure(lambda: None, lambda fn, n: trie._trie.time_retrieve(
        ctx.data_ptr(), ctx.numel(), TREE_NODES, BRANCH, 0, -1, n), plan)
    rows.append(row("retrieve hier (native, one context)", "C++ loop, warm caches",
                    t.median_us, t.min_us, repeats=t.repeats, iters=t.iters))
    print(f"{rows[-1]['name']:<34} {fmt_us(t.median_us):>9} µs", flush=True)
    for mode in ("hier", "parallel"):
        rows.append(timed(f"retrieve_batch {mode} (per row)",
                          f"native loop over {len(contexts)} distinct contexts",
                          lambda mode=mode: trie.retrieve_batch(contexts, mode=mode),
                          Plan(repeats=plan.repeats, max_iters=3, target_s=plan.target_s),
                          per=len(contexts)))

    # A request holding a long prompt: its prompt counts rank first.
    prompt = torch.from_numpy(corpus.take(4096))
    trie.insert(prompt, source="request", request_id=1)
    gen = torch.Generator().manual_seed(3)
    prompt_ctx = [prompt[p - 2:p].clone() for p in
                  torch.randint(2, len(prompt), (N_CONTEXTS,), generator=gen).tolist()]
    it = itertools.cycle(prompt_ctx)
    prompt_T = statistics.fmean(len(trie.retrieve(c, request_id=1)[0]) for c in prompt_ctx)
    rows.append(timed("retrieve hier, request with prompt",
                      f"Python API, 4,096-token prompt, mean T {prompt_T:.1f}",
                      lambda: trie.retrieve(next(it), request_id=1), plan))
    trie.end_request(1)

    # Insertion at steady state (eviction running).
    steps = torch.from_numpy(corpus.take(16 * 4096)).view(-1, 16)
    it = itertools.cycle(steps)
    rows.append(timed("insert 16 output tokens", "one step's accepted tokens",
                      lambda: trie.insert(next(it), source="shared"), plan))
    prompts = torch.from_numpy(corpus.take(2048 * 8)).view(-1, 2048)
    it = itertools.cycle(enumerate(prompts))

    def prompt_cycle() -> None:
        i, p = next(it)
        trie.insert(p, source="request", request_id=10 + i)
        trie.end_request(10 + i)

    rows.append(timed("insert 2048-token prompt + end", "prompt windows, then release",
                      prompt_cycle, Plan(repeats=min(plan.repeats, 10), max_iters=4,
                                         target_s=plan.target_s)))

    if device.type == "cuda":
        it = itertools.cycle(contexts)

        def to_gpu() -> None:
            tokens, parents = trie.retrieve(next(it))
            tokens.to(device)
            parents.to(device)
            torch.cuda.synchronize(device)

        rows.append(timed("retrieve hier + copy to GPU", "Python API, two H2D copies, synced",
                          to_gpu, plan))

    # Persistence, single runs.
    t0 = time.perf_counter()
    image = trie.to_bytes()
    save_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    back = TrieCache.from_bytes(image)
    load_s = time.perf_counter() - t0
    assert back.num_nodes == trie.num_nodes
    persist = {"bytes": len(image), "to_bytes_s": save_s, "from_bytes_s": load_s}
    print(f"to_bytes {save_s * 1e3:.0f} ms, from_bytes {load_s * 1e3:.0f} ms, "
          f"{len(image) / 2**20:.1f} MiB", flush=True)

    for r in rows:
        if r.get("goal"):
            r["goal_met"] = r["median_us"] < GOAL_US
    return {"build": built, "trees": trees, "persistence": persist, "rows": rows,
            "final_stats": trie.stats()}


# ---- output ---------------------------------------------------------------------------------


def markdown(report: dict) -> str:
    b, tr, p = report["build"], report["trees"], report["persistence"]
    lines = [
        f"# fastdecode TrieCache on {report['cpu']}",
        "",
        f"torch {report['torch']}, fastdecode {report['fastdecode']}, {report['date']}; device "
        f"`{report['device']}`; median over {report['plan']['repeats']} rounds (µs per call). "
        f"Host: {report['cpu_count']} cores, 1-minute load average "
        f"{report['load_average_1min']['start']:.1f} at the start and "
        f"{report['load_average_1min']['end']:.1f} at the end (a shared machine is noisy).",
        "",
        f"Goal: {GOAL}.",
        "",
        f"Trie: budget {report['settings']['max_nodes_total']:,} nodes, vocabulary {VOCAB:,}, "
        f"match_len {report['settings']['match_len']}, branch_length {BRANCH}; filled with "
        f"{b['tokens']:,} tokens of Markov-chain text as output ({b['windows']:,} windows, "
        f"{b['evictions']:,} evictions) in {b['seconds']:.2f} s "
        f"({b['windows_per_s']:,.0f} windows/s); {b['bytes'] / 2**20:.0f} MiB.",
        "",
        f"Contexts: {tr['contexts']} bigrams of the text with a full {TREE_NODES}-node tree, "
        f"visited round-robin (sampled bigrams: mean T {tr['mean_T']:.1f}, "
        f"{100 * tr['full_fraction']:.0f}% full).",
        "",
        "| operation | what | median µs | min µs | goal |",
        "| --- | --- | ---: | ---: | --- |",
    ]
    for r in report["rows"]:
        goal = {True: "met", False: "not met"}.get(r.get("goal_met"), "")
        lines.append(f"| {r['name']} | {r['what']} | {fmt_us(r['median_us'])} | "
                     f"{fmt_us(r['min_us'])} | {goal} |")
    lines += ["", f"Persistence of the full trie: to_bytes {p['to_bytes_s'] * 1e3:.0f} ms, "
              f"from_bytes (with full validation) {p['from_bytes_s'] * 1e3:.0f} ms, "
              f"{p['bytes'] / 2**20:.1f} MiB."]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = _report.parser(__doc__, "fewer, shorter rounds",
                       "where the run happens; the trie is always on the CPU (cuda adds the copy "
                       "of the tree to the GPU and names the results folder)")
    p.add_argument("--nodes", type=int, default=1 << 20, help="node budget (default 2^20)")
    return _report.parse(p, argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(1)  # no torch thread pool spinning against the timed thread
    load = os.getloadavg()[0]
    plan = Plan(repeats=5, max_iters=200, target_s=0.01) if args.quick else \
        Plan(repeats=30, max_iters=2000, target_s=0.05)
    results = run(args, device, plan)
    report = {
        "device": device_name(device),
        "device_type": device.type,
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "load_average_1min": {"start": load, "end": os.getloadavg()[0]},
        "torch": torch.__version__,
        "fastdecode": fastdecode.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "goal": GOAL,
        "plan": asdict(plan),
        "settings": {"vocab_size": VOCAB, "max_nodes_total": args.nodes, "match_len": 2,
                     "branch_length": BRANCH, "decoding_length": TREE_NODES,
                     "markov": {"states": STATES, "successors": SUCCESSORS,
                                "probs": list(PROBS)}},
        **results,
    }
    folder, also = _report.folders(args.out, RESULTS / device_slug(device))
    _report.save("trie", report, markdown(report), folder, also)


if __name__ == "__main__":
    main()
