"""Benchmark of fastdecode's primitive ops, per backend, against the same computation in plain
torch ops (the ``torch`` backend, forced with ``fastdecode.use_backend("torch")``).

Ops: verify_tree, tree_mask, tree_positions and pack_tree_mask on T=128 draft trees (a random
bushy tree and a chain; B=1 and B=16), and compact_kv on a 32-layer cache (64 tensors
[B, 8, S, 128], fp16; 16 rows moved per batch row). Every backend's result is first checked to
equal the torch backend's, so a wrong kernel is never timed. On CUDA each backend is timed
eagerly and, where capture works, as a replayed CUDA graph (kernel time without Python).

Usage: python bench/primitives.py [--device cpu|cuda] [--out DIR] [--quick]
Writes primitives.json and primitives.md into DIR (default bench/results/<device slug>/), and
also into $OUT when that is set and --out is not given.
"""

from __future__ import annotations

import argparse
import datetime
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

import fastdecode
from fastdecode import BackendUnavailableError, ops, use_backend

import _report
from _report import RESULTS, device_name, device_slug, fmt_us
from _timing import Plan, Timing, capture_graph, cuda_clock, host_clock, measure

T = 128
VOCAB = 32000
GOAL = "≤10 µs per primitive at T=128 and ≥5× faster than plain torch ops on H100/H200"
GOAL_US, GOAL_SPEEDUP = 10.0, 5.0


@dataclass
class Case:
    """One op at one size. ``run`` is the timed call (validate=False); ``result`` returns what
    is compared across backends (``run``'s output, or the tensors an in-place op wrote)."""

    op: str
    shape: str
    run: Callable[[], object]
    result: Callable[[], object]
    params: dict = field(default_factory=dict)


# ---- inputs ---------------------------------------------------------------------------------


def bushy_parents(B: int, gen: torch.Generator) -> torch.Tensor:
    """Random recursive trees: ``parents[b, j]`` uniform in [0, j) for j >= 1, -1 at the root."""
    j = torch.arange(T)
    parents = (torch.rand(B, T, generator=gen) * j).long()
    parents[:, 0] = -1
    return parents


def chain_parents(B: int) -> torch.Tensor:
    """Chains: node j's parent is j - 1."""
    return (torch.arange(T) - 1).expand(B, T).clone()


def depths(parents: torch.Tensor) -> list[list[int]]:
    """Depth of every node of every row (root 0), for trees obeying the rules."""
    out = []
    for row in parents.tolist():
        d = [0] * T
        for j in range(1, T):
            d[j] = d[row[j]] + 1
        out.append(d)
    return out


def verify_inputs(parents: torch.Tensor, gen: torch.Generator
                  ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Random draft tokens and predictions, with the predictions along the path to one random
    leaf per row made to match, so that path is accepted. Returns the intended accept lengths."""
    B = parents.shape[0]
    draft = torch.randint(VOCAB, (B, T), generator=gen)
    predicted = torch.randint(VOCAB, (B, T), generator=gen)
    accept = []
    for b, (row, d) in enumerate(zip(parents.tolist(), depths(parents))):
        leaves = sorted(set(range(T)) - set(row))
        node = leaves[int(torch.randint(len(leaves), (1,), generator=gen))]
        accept.append(d[node])
        while node != 0:
            predicted[b, row[node]] = draft[b, node]
            node = row[node]
    return draft, predicted, accept


def tree_cases(device: torch.device, gen: torch.Generator) -> list[Case]:
    """The four tree ops on a bushy tree and a chain, with B = 1 and 16."""
    cases = []
    for B in (1, 16):
        for kind, parents in (("bushy", bushy_parents(B, gen)), ("chain", chain_parents(B))):
            draft, predicted, accept = verify_inputs(parents, gen)
            max_depth = max(max(d) for d in depths(parents))
            prefix = torch.randint(100, 2000, (B,), generator=gen)
            parents, draft, predicted, prefix = (x.to(device) for x in (parents, draft, predicted, prefix))
            with use_backend("torch"):
                mask = ops.tree_mask(parents, validate=False)
            shape = f"B={B} T={T} {kind}"
            params = {"B": B, "T": T, "tree": kind, "max_depth": max_depth}
            calls: dict[str, Callable[[], object]] = {
                "verify_tree": lambda d=draft, p=parents, q=predicted, m=max_depth: ops.verify_tree(
                    d, p, q, max_depth=m, validate=False),
                "tree_mask": lambda p=parents: ops.tree_mask(p, validate=False),
                "tree_positions": lambda p=parents, n=prefix: ops.tree_positions(p, n, validate=False),
                "pack_tree_mask": lambda m=mask: ops.pack_tree_mask(m),
            }
            for op, call in calls.items():
                extra = {"accept_len": accept} if op == "verify_tree" else {}
                cases.append(Case(op, shape, call, call, {**params, **extra}))
    return cases


def compact_case(device: torch.device, B: int, layers: int, S: int, count: int = 16) -> Case:
    """compact_kv over ``layers`` layers (2 tensors each) of [B, 8, S, 128] fp16, moving
    ``count`` rows per batch row from sorted distinct offsets in [0, 128) after start = S - 160."""
    caches = [torch.randn(B, 8, S, 128, dtype=torch.float16, device=device)
              for _ in range(2 * layers)]
    start = torch.full((B,), S - 160, dtype=torch.int64, device=device)
    src = torch.stack([torch.randperm(128)[:count].sort().values for _ in range(B)]).to(device)
    n = torch.full((B,), count, dtype=torch.int64, device=device)

    def run() -> None:
        ops.compact_kv(caches, start, src, n, validate=False)

    def result() -> list[torch.Tensor]:
        fresh = [t.clone() for t in caches]
        ops.compact_kv(fresh, start, src, n, validate=False)
        return fresh

    shape = f"B={B} L={layers} H=8 S={S} D=128 fp16, {count} rows"
    params = {"B": B, "layers": layers, "tensors": 2 * layers, "S": S, "count": count}
    return Case("compact_kv", shape, run, result, params)


def all_cases(device: torch.device) -> list[Case]:
    """Every benchmarked op and size. On CPU the B=16 cache has 4 layers, to keep the run short."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if device.type == "cuda":
        kv = [compact_case(device, 1, 32, 2048), compact_case(device, 16, 32, 2048)]
    else:
        kv = [compact_case(device, 1, 32, 256), compact_case(device, 16, 4, 256)]
    return tree_cases(device, gen) + kv


# ---- checking and timing --------------------------------------------------------------------


def same(a: object, b: object) -> bool:
    """Exact equality of tensors, or of (nested) sequences of them."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return False


def runnable_backends(case: Case) -> list[str]:
    """The backends that run ``case`` here, each checked to give the torch backend's result."""
    with use_backend("torch"):
        expected = case.result()
    backends = []
    for backend in fastdecode.BACKENDS:
        try:
            with use_backend(backend):
                got = case.result()
        except BackendUnavailableError:
            continue
        if not same(got, expected):
            raise AssertionError(f"{case.op} [{case.shape}]: backend {backend!r} disagrees "
                                 "with the torch backend")
        backends.append(backend)
    return backends


def time_case(case: Case, device: torch.device, plan: Plan) -> list[dict]:
    """Rows for every backend of ``case``: eager, and on CUDA also replayed as a CUDA graph."""
    clock = cuda_clock if device.type == "cuda" else host_clock
    rows = []
    for backend in runnable_backends(case):
        with use_backend(backend):
            rows.append(row(case, backend, "eager", measure(case.run, clock, plan)))
            if device.type == "cuda":
                rows.append(graph_row(case, backend, plan))
    return rows


def graph_row(case: Case, backend: str, plan: Plan) -> dict:
    """The row of ``case`` captured once in a CUDA graph and timed by replaying it."""
    try:
        graph = capture_graph(case.run)
    except Exception as e:  # any capture failure is a result worth reporting, not a crash
        torch.cuda.synchronize()
        return row(case, backend, "graph", None, f"{type(e).__name__}: {e}")
    return row(case, backend, "graph", measure(graph.replay, cuda_clock, plan))


def row(case: Case, backend: str, mode: str, timing: Timing | None, error: str | None = None
        ) -> dict:
    """One result row (speedups are added once the torch rows are known)."""
    out = {"op": case.op, "shape": case.shape, "params": case.params, "backend": backend,
           "mode": mode}
    if timing is not None:
        out.update(asdict(timing))  # median_us, min_us, repeats, iters
    if error is not None:
        out["error"] = error
    return out


def add_speedups(rows: list[dict]) -> None:
    """Speedup of every timed row over the eager torch backend on the same op and shape, and of
    graph rows over the torch backend's graph; on CUDA rows, whether the goal is met."""
    base = {(r["op"], r["shape"], r["mode"]): r.get("median_us")
            for r in rows if r["backend"] == "torch"}
    for r in rows:
        if "median_us" not in r:
            continue
        eager = base.get((r["op"], r["shape"], "eager"))
        r["speedup_vs_torch"] = eager / r["median_us"] if eager else None
        if r["mode"] == "graph":
            graphed = base.get((r["op"], r["shape"], "graph"))
            r["speedup_vs_torch_graph"] = graphed / r["median_us"] if graphed else None
        if r["backend"] == "cuda" and r["speedup_vs_torch"] is not None:
            r["goal_met"] = r["median_us"] <= GOAL_US and r["speedup_vs_torch"] >= GOAL_SPEEDUP


# ---- output ---------------------------------------------------------------------------------


def fmt_x(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}×"


def markdown(report: dict) -> str:
    """The report as a markdown page: header facts, the goal and one table row per result."""
    cuda = report["device_type"] == "cuda"
    lines = [
        f"# fastdecode primitives on {report['device']}",
        "",
        f"torch {report['torch']}, fastdecode {report['fastdecode']}, {report['date']}; "
        f"median over {report['plan']['repeats']} rounds of up to {report['plan']['max_iters']} "
        "calls, validate=False. Baseline: the `torch` backend (plain torch ops, eager).",
        "",
        f"Goal: {GOAL}.",
        "",
    ]
    if cuda:
        lines += ["Goal column (cuda rows): median ≤ 10 µs and ≥ 5× faster than eager plain "
                  "torch. `graph` rows replay a captured CUDA graph (no Python overhead); "
                  "`vs torch graph` compares them with the torch backend's graph.", ""]
        lines += ["| op | shape | backend | mode | median µs | vs torch | vs torch graph | goal |",
                  "| --- | --- | --- | --- | ---: | ---: | ---: | --- |"]
    else:
        lines += ["The goal is a GPU goal; it is not assessed on CPU.", ""]
        lines += ["| op | shape | backend | median µs | vs torch |",
                  "| --- | --- | --- | ---: | ---: |"]
    for r in report["rows"]:
        if "error" in r:
            cells = [r["op"], r["shape"], r["backend"], r["mode"], "capture failed: "
                     + r["error"].replace("|", "/").splitlines()[0], "", "", ""]
        elif cuda:
            goal = {True: "met", False: "not met"}.get(r.get("goal_met"), "")
            cells = [r["op"], r["shape"], r["backend"], r["mode"], fmt_us(r["median_us"]),
                     fmt_x(r["speedup_vs_torch"]), fmt_x(r.get("speedup_vs_torch_graph")), goal]
        else:
            cells = [r["op"], r["shape"], r["backend"], fmt_us(r["median_us"]),
                     fmt_x(r["speedup_vs_torch"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ---- main -----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = _report.parser(__doc__, "fewer, shorter rounds")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: the cpu backend's kernels are serial, "
                   "and a serial baseline avoids thread-pool wake-up noise)")
    return _report.parse(p, argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    plan = Plan(repeats=5, max_iters=10, target_s=0.005) if args.quick else Plan()
    rows = []
    for case in all_cases(device):
        rows += time_case(case, device, plan)
        print(f"{case.op:<15} {case.shape:<40} " + "  ".join(
            f"{r['backend']}/{r['mode']}: " + (fmt_us(r["median_us"]) if "median_us" in r else "failed")
            for r in rows if r["op"] == case.op and r["shape"] == case.shape), flush=True)
    add_speedups(rows)
    report = {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "fastdecode": fastdecode.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch_threads": torch.get_num_threads(),
        "goal": GOAL,
        "plan": asdict(plan),
        "info": {k: v for k, v in fastdecode.info().items() if k != "ops"},
        "rows": rows,
    }
    folder, also = _report.folders(args.out, RESULTS / device_slug(device))
    _report.save("primitives", report, markdown(report), folder, also)


if __name__ == "__main__":
    main()
