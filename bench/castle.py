"""Benchmark of CASTLE attention (``fastdecode.ops.castle_attention`` and ``castle_decode``)
against causal ``torch.nn.functional.scaled_dot_product_attention`` (the flash backend on GPU).

Layer rows (the attention core only, inputs ``[B, H, L, D]`` given): forward and forward +
backward of CASTLE at equal heads (16) and at the paper's parameter parity (9 CASTLE heads
against 16 standard heads, D=128), SDPA causal with 16 heads, the blocked plain-torch
implementation (the ``torch`` backend; "castle torch (blocked)" on CUDA) up to
``reference_max_L``, and the PyPI package ``lookahead-keys-attention`` when it is installed
(its whole layer against ``fastdecode.nn.CastleAttention``'s, at L <= 2048). Each row reports
the median time, TFLOP/s by a fixed FLOP count (CASTLE forward ``L^2 (5D + 64)``
and backward ``L^2 (16D + 192)`` per batch row and head; causal SDPA ``2 L^2 D`` and
``5 L^2 D``) and, on CUDA, the peak memory the call allocates beyond its inputs.

Decode rows: one decoding step (append the token to the cache, attend) against context length:
``castle_decode`` with 9 and 16 heads against a standard step with 16 heads (write k, v into a
preallocated cache, SDPA of one query over it), eager and, on CUDA, replayed as a CUDA graph.

On CUDA (default, about a minute): bf16, B=1, D=128, L from 512 to 16384, decode contexts from
512 to 16384. ``--budget`` seconds (default 75 on CUDA; 70% for the layer rows) bound the run:
once spent, the remaining lengths and contexts are skipped and listed in the results.

On CPU: fp32, D=64, 4 and 2 heads against 4, L up to 1024; the CASTLE rows use the torch
backend (the Triton kernels need a GPU). The goals are set for a GPU: on CPU they are
evaluated for information only.

Usage: python bench/castle.py [--device cpu|cuda] [--out DIR] [--quick]
Writes castle.json, castle.md and castle.png into DIR (default bench/results/<device slug>/),
and copies them into $OUT when that is set and --out is not given.
"""

from __future__ import annotations

import datetime
import importlib.util
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

import fastdecode
from fastdecode import _backend
from fastdecode.nn.castle import CastleAttention
from fastdecode.ops import CastleCache, castle_attention, castle_prefill

import _report
from _report import RESULTS, device_name, device_slug, fmt_us
from _timing import Plan, Timing, capture_graph, cuda_clock, host_clock, measure

NAME = "castle"
FLOP_BLOCK = 64  # the block size the FLOP formulas assume
PACKAGE = "lookahead_keys_attention"


@dataclass(frozen=True)
class Setup:
    """The sizes of one run."""

    dtype: str
    B: int
    D: int
    heads_std: int
    heads_parity: int
    lengths: tuple[int, ...]
    reference_max_L: int
    package_max_L: int
    contexts: tuple[int, ...]


def setup(device: torch.device, quick: bool) -> Setup:
    if device.type == "cuda":
        lengths = (512, 2048, 4096, 8192) if quick else (512, 1024, 2048, 4096, 8192, 16384)
        contexts = (512, 4096) if quick else (512, 1024, 2048, 4096, 8192, 16384)
        return Setup("bfloat16", 1, 128, 16, 9, lengths, 2048, 2048, contexts)
    lengths = (128, 256) if quick else (128, 256, 512, 1024)
    contexts = (256, 1024) if quick else (256, 1024, 4096)
    return Setup("float32", 1, 64, 4, 2, lengths, 1024, 512, contexts)


def castle_flops(B: int, H: int, L: int, D: int, backward: bool) -> float:
    fwd = B * H * L * L * (5 * D + FLOP_BLOCK)
    return fwd + (B * H * L * L * (16 * D + 3 * FLOP_BLOCK) if backward else 0)


def sdpa_flops(B: int, H: int, L: int, D: int, backward: bool) -> float:
    return B * H * L * L * D * (2 + (5 if backward else 0))


# ---- layer rows -------------------------------------------------------------------------------


def castle_backend(device: torch.device) -> str:
    return _backend.select("castle_attention", device)[0]


def layer_calls(kind: str, B: int, H: int, L: int, D: int, dtype: torch.dtype,
                device: torch.device, backend: str | None
                ) -> tuple[Callable[[], object], Callable[[], object]]:
    """``(forward, forward + backward)`` of one implementation on fresh random inputs."""
    gen = torch.Generator(device=device).manual_seed(L)
    n = 6 if kind == "castle" else 3
    xs = [torch.randn(B, H, L, D, generator=gen, device=device, dtype=dtype).requires_grad_()
          for _ in range(n)]
    dout = torch.randn(B, H, L, D, device=device, dtype=dtype)

    def fwd() -> torch.Tensor:
        with torch.no_grad():
            return run(*xs)

    def run(*t: torch.Tensor) -> torch.Tensor:
        if kind == "sdpa":
            return F.scaled_dot_product_attention(*t, is_causal=True)
        with fastdecode.use_backend(backend):
            return castle_attention(*t)

    def fwd_bwd() -> tuple:
        return torch.autograd.grad(run(*xs), xs, dout)

    return fwd, fwd_bwd


def package_calls(B: int, H: int, L: int, D: int, dtype: torch.dtype, device: torch.device
                  ) -> dict[str, tuple[Callable[[], object], Callable[[], object]]]:
    """The whole layer of ``lookahead-keys-attention`` and of ``CastleAttention`` (same width,
    heads and head dim), forward and forward + backward."""
    from lookahead_keys_attention import Castle

    dim = H * D
    theirs = Castle(dim=dim, heads=H, dim_head=D).to(device=device, dtype=dtype)
    ours = CastleAttention(dim, H, D, rope=False).to(device=device, dtype=dtype)
    x = torch.randn(B, L, dim, device=device, dtype=dtype, requires_grad=True)
    calls = {}
    for name, module in (("lookahead-keys-attention layer", theirs),
                         ("fastdecode CastleAttention layer", ours)):
        def fwd(m=module) -> torch.Tensor:
            with torch.no_grad():
                return m(x)

        def fwd_bwd(m=module) -> tuple:
            return torch.autograd.grad(m(x).float().square().mean(), x)

        calls[name] = (fwd, fwd_bwd)
    return calls


def peak_mib(fn: Callable[[], object], device: torch.device) -> float | None:
    """MiB allocated at the peak of one call beyond what was allocated before it (CUDA)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


class Budget:
    """Wall seconds left for the run; ``spent()`` once they are gone."""

    def __init__(self, seconds: float) -> None:
        self.end = time.perf_counter() + seconds
        self.skipped: list[str] = []

    def spent(self, what: str) -> bool:
        if time.perf_counter() < self.end:
            return False
        self.skipped.append(what)
        print(f"time budget spent: skipping {what}", flush=True)
        return True


def layer_rows(s: Setup, device: torch.device, plan: Plan, budget: Budget) -> list[dict]:
    dtype = getattr(torch, s.dtype)
    clock = cuda_clock if device.type == "cuda" else host_clock
    backend = castle_backend(device)
    impls = [(f"castle {backend}", "castle", s.heads_parity, backend),
             (f"castle {backend}", "castle", s.heads_std, backend),
             ("sdpa causal", "sdpa", s.heads_std, None)]
    if backend != "torch":
        impls += [("castle torch (blocked)", "castle", s.heads_parity, "torch")]
    rows = []
    for L in s.lengths:
        if budget.spent(f"layer L={L}"):
            continue
        for label, kind, H, be in impls:
            if be == "torch" and L > s.reference_max_L:
                continue
            calls = layer_calls(kind, s.B, H, L, s.D, dtype, device, be)
            flops = castle_flops if kind == "castle" else sdpa_flops
            for mode, fn in zip(("fwd", "fwd+bwd"), calls):
                rows.append(layer_row(label, H, L, s, mode, fn, device, clock, plan,
                                      flops(s.B, H, L, s.D, mode != "fwd")))
            del calls
        if importlib.util.find_spec(PACKAGE) and L <= s.package_max_L:
            rows += package_rows(s, L, dtype, device, clock, plan)
        print(f"L={L}: " + "  ".join(
            f"{r['impl']} H={r['heads']} {r['mode']} {fmt_us(r['median_us'])} µs"
            for r in rows if r["L"] == L and "median_us" in r), flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def package_rows(s: Setup, L: int, dtype, device, clock, plan) -> list[dict]:
    try:
        calls = package_calls(s.B, s.heads_parity, L, s.D, dtype, device)
    except Exception as e:  # an unexpected API is a result to report, not a crash
        return [{"impl": "lookahead-keys-attention layer", "heads": s.heads_parity, "L": L,
                 "mode": "fwd+bwd", "error": f"{type(e).__name__}: {e}"}]
    rows = []
    for label, pair in calls.items():
        for mode, fn in zip(("fwd", "fwd+bwd"), pair):
            try:
                rows.append(layer_row(label, s.heads_parity, L, s, mode, fn, device, clock, plan,
                                      None))
            except Exception as e:  # e.g. an output that is not a tensor: report it
                rows.append({"impl": label, "heads": s.heads_parity, "L": L, "mode": mode,
                             "error": f"{type(e).__name__}: {e}"})
    return rows


def layer_row(label: str, H: int, L: int, s: Setup, mode: str, fn: Callable[[], object],
              device: torch.device, clock, plan: Plan, flops: float | None) -> dict:
    row = {"impl": label, "heads": H, "L": L, "D": s.D, "B": s.B, "dtype": s.dtype,
           "mode": mode}
    try:
        timing = measure(fn, clock, plan)
        row["peak_mib"] = peak_mib(fn, device)
    except torch.cuda.OutOfMemoryError as e:
        torch.cuda.empty_cache()
        return {**row, "error": f"OutOfMemoryError: {str(e).splitlines()[0]}"}
    row.update(timing_fields(timing))
    if flops is not None:
        row["tflops"] = flops / (timing.median_us * 1e-6) / 1e12
    return row


def timing_fields(t: Timing) -> dict:
    return {"median_us": t.median_us, "min_us": t.min_us, "repeats": t.repeats, "iters": t.iters}


# ---- decode rows ------------------------------------------------------------------------------


def castle_step(B: int, H: int, t: int, D: int, dtype, device) -> Callable[[], torch.Tensor]:
    """One CASTLE decoding step at context ``t``, repeatable: the cache is filled once, and each
    call writes the new token's rows at position t again and runs the fused step there."""
    gen = torch.Generator(device=device).manual_seed(t)
    x = [torch.randn(B, H, t + 1, D, generator=gen, device=device, dtype=dtype) for _ in range(6)]
    cache = CastleCache()
    castle_prefill(cache, *(v[:, :, :t] for v in x))
    qc, kc, vc, qu, ku, vu = (v[:, :, t:].contiguous() for v in x)
    state = cache.layers[0]
    state.grow(t + 1)
    scale = 1 / math.sqrt(D)

    def step() -> torch.Tensor:
        state.lookahead_queries(t, t + 1)[:] = qu
        state.kc[:, :, t:t + 1] = kc
        state.vc[:, :, t:t + 1] = vc
        return _backend.run("castle_decode", device, state.u, state.qu, state.qu_base, state.kc,
                            state.vc, t, qc, ku, vu, -1, scale)

    return step


def standard_step(B: int, H: int, t: int, D: int, dtype, device) -> Callable[[], torch.Tensor]:
    """One standard attention decoding step at context ``t``: write k, v at row t of a
    preallocated cache and attend with SDPA over rows 0..t."""
    k_cache = torch.randn(B, H, t + 1, D, device=device, dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    q, k, v = (torch.randn(B, H, 1, D, device=device, dtype=dtype) for _ in range(3))

    def step() -> torch.Tensor:
        k_cache[:, :, t:t + 1] = k
        v_cache[:, :, t:t + 1] = v
        return F.scaled_dot_product_attention(q, k_cache, v_cache)

    return step


def decode_rows(s: Setup, device: torch.device, plan: Plan, budget: Budget) -> list[dict]:
    dtype = getattr(torch, s.dtype)
    clock = cuda_clock if device.type == "cuda" else host_clock
    backend = _backend.select("castle_decode", device)[0]
    rows = []
    for t in s.contexts:
        if budget.spent(f"decode context={t}"):
            continue
        impls = [(f"castle_decode {backend}", s.heads_parity, castle_step),
                 (f"castle_decode {backend}", s.heads_std, castle_step),
                 ("standard (sdpa)", s.heads_std, standard_step)]
        for label, H, make in impls:
            with torch.no_grad():
                fn = make(s.B, H, t, s.D, dtype, device)
                base = {"impl": label, "heads": H, "context": t, "D": s.D, "B": s.B,
                        "dtype": s.dtype}
                rows.append({**base, "mode": "eager", **timing_fields(measure(fn, clock, plan))})
                if device.type == "cuda":
                    try:
                        graph = capture_graph(fn)
                        rows.append({**base, "mode": "graph",
                                     **timing_fields(measure(graph.replay, cuda_clock, plan))})
                    except Exception as e:  # a capture failure is worth reporting
                        torch.cuda.synchronize()
                        rows.append({**base, "mode": "graph", "error": f"{type(e).__name__}: {e}"})
        print(f"context {t}: " + "  ".join(
            f"{r['impl']} H={r['heads']} {r['mode']} {fmt_us(r['median_us'])} µs"
            for r in rows if r["context"] == t and "median_us" in r), flush=True)
    return rows


# ---- goals, output ----------------------------------------------------------------------------


def find(rows: list[dict], **want) -> dict | None:
    for r in rows:
        if all(r.get(k) == v for k, v in want.items()) and "median_us" in r:
            return r
    return None


def goals(report: dict) -> dict:
    """The issue's GPU goals, evaluated where the rows allow (bf16, L = 4096, parity heads)."""
    s = report["setup"]
    layers, decode = report["layers"], report["decode"]
    out = {}
    castle = [r for r in layers if r["impl"].startswith("castle ") and "(blocked)" not in r["impl"]]
    c = find(castle, heads=s["heads_parity"], L=4096, mode="fwd+bwd")
    f = find(layers, impl="sdpa causal", L=4096, mode="fwd+bwd")
    if c and f:
        ratio = c["median_us"] / f["median_us"]
        out["fwd+bwd at parity / SDPA, L=4096 (goal <= 2.5)"] = {"value": ratio,
                                                                  "met": ratio <= 2.5}
    mem = [(r["L"], r["peak_mib"]) for r in castle
           if r["heads"] == s["heads_parity"] and r["mode"] == "fwd+bwd" and r.get("peak_mib")]
    if len(mem) >= 2:
        (l0, m0), (l1, m1) = mem[0], mem[-1]
        growth = (m1 / m0) / (l1 / l0)
        out[f"peak memory growth / length growth, L={l0}..{l1} (linear: about 1)"] = {
            "value": growth, "met": growth <= 1.25}
    theirs = find(layers, impl="lookahead-keys-attention layer", L=2048, mode="fwd+bwd")
    ours = find(layers, impl="fastdecode CastleAttention layer", L=2048, mode="fwd+bwd")
    if theirs and ours:
        speedup = theirs["median_us"] / ours["median_us"]
        out["speedup over lookahead-keys-attention, L=2048 (goal >= 20)"] = {
            "value": speedup, "met": speedup >= 20}
    elif not report["package"]:
        out["speedup over lookahead-keys-attention"] = {"value": None,
                                                        "met": "not installed"}
    mode = "graph" if report["device_type"] == "cuda" else "eager"
    d = [r for r in decode if r["impl"].startswith("castle_decode")]
    cd = find(d, heads=s["heads_parity"], context=4096, mode=mode)
    sd = find(decode, impl="standard (sdpa)", context=4096, mode=mode)
    if cd and sd:
        ratio = cd["median_us"] / sd["median_us"]
        out[f"decode step at 4k, parity heads / standard ({mode}) (goal <= 1.5)"] = {
            "value": ratio, "met": ratio <= 1.5}
    return out


def markdown(report: dict) -> str:
    s = report["setup"]
    lines = [
        f"# CASTLE attention on {report['device']}",
        "",
        f"torch {report['torch']}, triton {report['triton']}, fastdecode "
        f"{report['fastdecode']}, {report['date']}; {report['note']}",
        "",
        f"{s['dtype']}, B={s['B']}, D={s['D']}; parameter parity is {s['heads_parity']} CASTLE "
        f"heads against {s['heads_std']} standard heads. TFLOP/s by fixed FLOP counts "
        "(CASTLE fwd L²(5D+64), bwd L²(16D+192); causal SDPA fwd 2L²D, bwd 5L²D). "
        f"lookahead-keys-attention: {report['package'] or 'not installed'}."
        + (f" Skipped for the time budget: {', '.join(report['skipped_for_time'])}."
           if report["skipped_for_time"] else ""),
        "",
        "## Goals" + ("" if report["device_type"] == "cuda"
                      else " (set for an H100/H200 in bf16: for information only on CPU)"),
        "",
        "| goal | value | met |",
        "| --- | ---: | --- |",
    ]
    for name, g in report["goals"].items():
        value = "-" if g["value"] is None else f"{g['value']:.2f}"
        lines.append(f"| {name} | {value} | {g['met']} |")
    lines += ["", "## Layer (attention core)", "",
              "| impl | heads | L | mode | median µs | TFLOP/s | peak MiB |",
              "| --- | ---: | ---: | --- | ---: | ---: | ---: |"]
    for r in report["layers"]:
        if "error" in r:
            lines.append(f"| {r['impl']} | {r['heads']} | {r['L']} | {r['mode']} | "
                         f"failed: {r['error'][:80]} | | |")
            continue
        tf = f"{r['tflops']:.3f}" if "tflops" in r else "-"
        mem = f"{r['peak_mib']:.0f}" if r.get("peak_mib") is not None else "-"
        lines.append(f"| {r['impl']} | {r['heads']} | {r['L']} | {r['mode']} | "
                     f"{fmt_us(r['median_us'])} | {tf} | {mem} |")
    lines += ["", "## Decode step", "",
              "| impl | heads | context | mode | median µs |",
              "| --- | ---: | ---: | --- | ---: |"]
    for r in report["decode"]:
        timing = fmt_us(r["median_us"]) if "median_us" in r else f"failed: {r['error'][:80]}"
        lines.append(f"| {r['impl']} | {r['heads']} | {r['context']} | {r['mode']} | {timing} |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> Path | None:
    """Three panels: fwd+bwd time against L, peak memory against L (CUDA), decode step
    against context."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    series: dict[str, list] = {}
    memory: dict[str, list] = {}
    for r in report["layers"]:
        if r["mode"] != "fwd+bwd" or "median_us" not in r:
            continue
        key = f"{r['impl']} H={r['heads']}"
        series.setdefault(key, []).append((r["L"], r["median_us"] / 1e3))
        if r.get("peak_mib") is not None:
            memory.setdefault(key, []).append((r["L"], r["peak_mib"]))
    decode: dict[str, list] = {}
    for r in report["decode"]:
        if "median_us" in r:
            decode.setdefault(f"{r['impl']} H={r['heads']} {r['mode']}", []).append(
                (r["context"], r["median_us"]))
    panels = ((axes[0], series, "L", "fwd+bwd ms"), (axes[1], memory, "L", "peak MiB"),
              (axes[2], decode, "context", "decode step µs"))
    for ax, data, xlabel, ylabel in panels:
        for label, points in sorted(data.items()):
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if data:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "not measured on this device", ha="center",
                    transform=ax.transAxes)
    fig.suptitle(f"CASTLE attention on {report['device']} ({report['setup']['dtype']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    p = _report.parser(__doc__, "fewer lengths and contexts")
    p.add_argument("--budget", type=float,
                   help="wall seconds for the layer and decode rows (default: 75 on CUDA, "
                   "600 on CPU)")
    args = _report.parse(p, argv)
    device = torch.device(args.device)
    s = setup(device, args.quick)
    plan = Plan(repeats=5, max_iters=10, target_s=0.02, warmup=2)
    torch.manual_seed(0)
    seconds = args.budget or (75.0 if device.type == "cuda" else 600.0)
    start = time.perf_counter()
    layer_budget = Budget(0.7 * seconds)
    layers = layer_rows(s, device, plan, layer_budget)
    decode_budget = Budget(seconds - (time.perf_counter() - start))
    decode = decode_rows(s, device, plan, decode_budget)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    package = None
    if importlib.util.find_spec(PACKAGE):
        from importlib.metadata import PackageNotFoundError, version

        try:
            package = version("lookahead-keys-attention")
        except PackageNotFoundError:
            package = "installed (version unknown)"
    note = ("1 core (taskset -c 1), other jobs running on the machine"
            if device.type == "cpu" else "one GPU")
    report = {
        "device": device_name(device), "device_type": device.type, "torch": torch.__version__,
        "triton": triton_version, "fastdecode": fastdecode.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "note": note, "package": package, "setup": asdict(s), "plan": asdict(plan),
        "layers": layers, "decode": decode,
        "skipped_for_time": layer_budget.skipped + decode_budget.skipped,
    }
    report["goals"] = goals(report)
    folder, also = _report.folders(args.out, RESULTS / device_slug(device))
    png = plot(report, folder / f"{NAME}.png")
    _report.save(NAME, report, markdown(report), folder, also, [png] if png else [])


if __name__ == "__main__":
    main()
