"""Benchmark of tree attention (``fastdecode.ops.tree_attention``): the Triton kernel against
torch SDPA given the equivalent 4-D boolean mask, and against the plain-torch reference (the
``torch`` backend: a dense mask, fp32 matmul and softmax).

On CUDA: first the goal shape (B=1, T=64 tree tokens after a prefix of 4096 keys, 32 heads of
128, bf16) and its grouped-query twin (Hkv=8); then Llama-7B-like layers, fp16, D=128, Hq=Hkv=32
and Hq=32, Hkv=8, with T in {16, 64, 128, 256}, prefixes of 512 and 4096 cached keys and B in
{1, 8} (row b's prefix starts at b, so rows differ). Every tree implementation's output is first
checked against the reference. Each call is timed eagerly and, except the torch reference, as a
replayed CUDA graph (kernel time without Python launch costs). The SDPA mask is built once,
outside the timed call, as a model builds it once per step for all its layers.

Baselines on CUDA, besides SDPA with the dense boolean mask:

* ``fa2 decode``: plain decoding over the same prefix, one query token per row against keys
  ``[0, prefix)`` through SDPA restricted to its FlashAttention-2 backend; with the package
  ``flash_attn`` installed, ``flash_attn decode`` too. A tree step that costs little more than
  this verifies T tokens for the price of one.
* ``flashinfer custom mask`` (B=1, when ``flashinfer`` is installed): FlashInfer's single-request
  prefill attention given the same tree mask as a dense boolean ``[T, prefix + T]`` mask.

``vs SDPA`` is SDPA's time over the row's (above 1: faster than SDPA); ``÷ FA2 decode`` is the
row's time over FA2 decode's, in the same mode. The goals, checked on the goal shape's graph
rows (eager when a capture fails): triton at least 2× faster than SDPA, and at most 1.3× FA2
decode.

On CPU: a tiny smoke configuration (the reference and SDPA; the triton backend too when
TRITON_INTERPRET=1, whose times mean nothing).

Usage: python bench/tree_attention.py [--device cpu|cuda] [--out DIR] [--quick]
Writes tree_attention.json, tree_attention.md and, when matplotlib is installed,
tree_attention.png (µs against T) into DIR (default bench/results/<device slug>/), and copies
them into $OUT when that is set and --out is not given.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

import fastdecode
from fastdecode import _backend, use_backend
from fastdecode.ops import pack_tree_mask, tree_attention, tree_mask
from fastdecode.ops.attention import visible_keys

import _report
from _report import RESULTS, device_name, device_slug, fmt_us
from _timing import Plan, Timing, capture_graph, cuda_clock, host_clock, measure

NAME = "tree_attention"
TOL = 2e-2  # fp16 and bf16 outputs, values of order 1
GOAL_VS_SDPA = 2.0  # triton at least this many times faster than SDPA with the dense mask
GOAL_VS_FA2 = 1.3  # triton at most this many times FA2's plain decode over the same prefix


@dataclass(frozen=True)
class Shape:
    """One benchmarked call: B rows, Hq/Hkv heads of dim D, T tree tokens after a prefix of
    ``prefix`` keys (row b's prefix is [b, prefix), so rows differ)."""

    B: int
    Hq: int
    Hkv: int
    D: int
    T: int
    prefix: int
    dtype: str = "float16"

    def label(self) -> str:
        heads = f"Hq=Hkv={self.Hq}" if self.Hkv == self.Hq else f"Hq={self.Hq}/Hkv={self.Hkv}"
        return f"B={self.B} {heads} D={self.D} T={self.T} prefix={self.prefix} {self.dtype}"


GOAL = Shape(B=1, Hq=32, Hkv=32, D=128, T=64, prefix=4096, dtype="bfloat16")


def shapes(device: torch.device, quick: bool) -> list[Shape]:
    """The benchmarked shapes: on CUDA the goal shape, its GQA twin and the grid (T=16 and 128
    only with --quick); one tiny shape on CPU."""
    if device.type != "cuda":
        return [Shape(B=2, Hq=4, Hkv=2, D=64, T=16, prefix=64, dtype="float32")]
    Ts = (16, 128) if quick else (16, 64, 128, 256)
    return [GOAL, Shape(GOAL.B, GOAL.Hq, 8, GOAL.D, GOAL.T, GOAL.prefix, GOAL.dtype)] + [
        Shape(B, Hq, Hkv, 128, T, prefix)
        for Hq, Hkv in ((32, 32), (32, 8)) for B in (1, 8) for prefix in (512, 4096)
        for T in Ts]


def inputs(shape: Shape, device: torch.device, gen: torch.Generator) -> dict:
    """Random q, k, v, per-row prefixes and a random bushy tree's packed mask; the tree's keys
    follow the longest prefix."""
    B, T = shape.B, shape.T
    dtype = getattr(torch, shape.dtype)
    S = shape.prefix + T
    j = torch.arange(T)
    parents = (torch.rand(B, T, generator=gen) * j).long()
    parents[:, 0] = -1

    def randn(*dims: int) -> torch.Tensor:
        return torch.randn(*dims, generator=gen).to(device=device, dtype=dtype)

    return dict(q=randn(B, shape.Hq, T, shape.D), k=randn(B, shape.Hkv, S, shape.D),
                v=randn(B, shape.Hkv, S, shape.D),
                kv_start=torch.arange(B, device=device), kv_len=torch.full(
                    (B,), shape.prefix, dtype=torch.int64, device=device),
                seg_start=shape.prefix, mask=pack_tree_mask(tree_mask(parents)).to(device))


OURS = ("triton", "torch")  # fastdecode's backends: a wrong output of theirs is a failure


def implementations(a: dict) -> dict[str, Callable[[], torch.Tensor]]:
    """Each timed tree-attention call, returning ``[B, T, Hq, D]``: the op on the triton backend
    (when it runs on these tensors here) and on the torch backend, SDPA with a prebuilt boolean
    mask and, on CUDA for one row when the package is installed, FlashInfer's custom-mask
    prefill."""
    Hq, Hkv = a["q"].shape[1], a["k"].shape[1]
    dense = visible_keys(a["kv_start"], a["kv_len"], a["seg_start"], a["mask"],
                         a["k"].shape[2])[:, None]  # [B, 1, T, S]

    def op(backend: str) -> Callable[[], torch.Tensor]:
        def call() -> torch.Tensor:
            with use_backend(backend):
                return tree_attention(**a, validate=False)
        return call

    def sdpa() -> torch.Tensor:
        out = F.scaled_dot_product_attention(a["q"], a["k"], a["v"], attn_mask=dense,
                                             enable_gqa=Hq != Hkv)
        return out.transpose(1, 2)

    runs = _backend._why_not("triton", a["q"].device.type) is None
    impls = {**({"triton": op("triton")} if runs else {}), "sdpa": sdpa, "torch": op("torch")}
    flashinfer = optional("flashinfer")
    if flashinfer is not None and a["q"].is_cuda and a["q"].shape[0] == 1:
        q = a["q"][0].transpose(0, 1).contiguous()  # [T, Hq, D]
        k, v = (a[n][0].transpose(0, 1).contiguous() for n in "kv")  # [S, Hkv, D]
        mask = dense[0, 0].contiguous()  # [T, S]
        impls["flashinfer custom mask"] = lambda: flashinfer.single_prefill_with_kv_cache(
            q, k, v, custom_mask=mask)[None]
    return impls


def decode_baselines(a: dict, prefix: int) -> dict[str, Callable[[], torch.Tensor]]:
    """Plain decoding over the same prefix on CUDA (one query token per row against keys
    ``[0, prefix)``): SDPA held to its FlashAttention-2 backend and, when installed, the
    ``flash_attn`` package. Timed only: they compute another thing than the tree."""
    if not a["q"].is_cuda:
        return {}
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = a["q"][:, :, :1]
    k, v = a["k"][:, :, :prefix], a["v"][:, :, :prefix]
    gqa = q.shape[1] != k.shape[1]

    def fa2() -> torch.Tensor:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)

    out = {"fa2 decode": fa2}
    flash_attn = optional("flash_attn")
    if flash_attn is not None:
        qn = q.transpose(1, 2)  # [B, 1, Hq, D]
        kn, vn = k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()
        out["flash_attn decode"] = lambda: flash_attn.flash_attn_func(qn, kn, vn)
    return out


def optional(name: str):
    """The module ``name``, or None when it is not installed or fails to import."""
    try:
        return importlib.import_module(name)
    except Exception:  # a broken third-party install is "not there", not a bench failure
        return None


def time_shape(shape: Shape, device: torch.device, plan: Plan, gen: torch.Generator
               ) -> list[dict]:
    """Rows for every implementation of ``shape``, each tree implementation checked against the
    reference first (a wrong output of fastdecode's raises; a third party's is reported), then
    the decode baselines."""
    a = inputs(shape, device, gen)
    impls = implementations(a)
    want = impls["torch"]().float()
    clock = cuda_clock if device.type == "cuda" else host_clock
    rows = []
    for name, fn in impls.items():
        try:
            err = (fn().float() - want).abs().max().item()
            if not err <= TOL:
                raise AssertionError(f"{name} [{shape.label()}]: max |error| {err:.3g} > {TOL}")
        except Exception as e:
            if name in OURS:
                raise
            rows.append(row(shape, name, "eager", None, None, f"{type(e).__name__}: {e}"))
            continue
        rows += timed_rows(shape, name, fn, device, clock, plan, err)
    for name, fn in decode_baselines(a, shape.prefix).items():
        try:
            fn()
        except Exception as e:
            rows.append(row(shape, name, "eager", None, None, f"{type(e).__name__}: {e}"))
            continue
        rows += timed_rows(shape, name, fn, device, clock, plan, None)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def timed_rows(shape: Shape, name: str, fn: Callable[[], object], device: torch.device,
               clock, plan: Plan, err: float | None) -> list[dict]:
    """The eager row of ``fn`` and, on CUDA except for the torch reference, its graph row."""
    rows = [row(shape, name, "eager", measure(fn, clock, plan), err)]
    if device.type == "cuda" and name != "torch":
        rows.append(graph_row(shape, name, fn, plan, err))
    return rows


def graph_row(shape: Shape, name: str, fn: Callable[[], object], plan: Plan,
              err: float | None) -> dict:
    """The row of ``fn`` captured once in a CUDA graph and timed by replaying it."""
    try:
        graph = capture_graph(fn)
    except Exception as e:  # any capture failure is a result worth reporting, not a crash
        torch.cuda.synchronize()
        return row(shape, name, "graph", None, err, f"{type(e).__name__}: {e}")
    return row(shape, name, "graph", measure(graph.replay, cuda_clock, plan), err)


def row(shape: Shape, impl: str, mode: str, timing: Timing | None, err: float | None,
        error: str | None = None) -> dict:
    """One result row; ``err`` is the max |error| against the reference (None: not checked)."""
    out = {"shape": shape.label(), "params": asdict(shape), "impl": impl, "mode": mode,
           "max_abs_err": err}
    if impl == "triton":
        out["splits"] = triton_splits(shape)
    if timing is not None:
        out.update(asdict(timing))  # median_us, min_us, repeats, iters
    if error is not None:
        out["error"] = error
    return out


def triton_splits(shape: Shape) -> int:
    """The number of prefix slices the launcher picks for ``shape`` (1: no split-KV)."""
    from fastdecode.triton_kernels.tree import attention as kernels

    rows = shape.T * (shape.Hq // shape.Hkv)
    block_m = kernels._config(shape.D, rows, getattr(torch, shape.dtype))[0]
    programs = math.ceil(rows / block_m) * shape.B * shape.Hkv
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    return kernels.choose_splits(programs, shape.prefix, device)


def add_ratios(rows: list[dict]) -> None:
    """Each timed tree row's speedup over SDPA and its time over FA2 decode's, in the same mode
    (none where the baseline failed in that mode)."""
    def times(impl: str) -> dict[tuple[str, str], float]:
        return {(r["shape"], r["mode"]): r["median_us"] for r in rows
                if r["impl"] == impl and "median_us" in r}

    sdpa, fa2 = times("sdpa"), times("fa2 decode")
    for r in rows:
        if "median_us" not in r or r["impl"].endswith(" decode"):
            continue
        key = (r["shape"], r["mode"])
        if key in sdpa:
            r["vs_sdpa"] = sdpa[key] / r["median_us"]
        if key in fa2:
            r["over_fa2_decode"] = r["median_us"] / fa2[key]


def goals(rows: list[dict]) -> list[dict]:
    """The tree-attention goals on the goal shape's triton rows, each with its measured ratio
    (graph mode where triton and the baseline both have one, else eager) and 'met', 'not met'
    or 'not assessed'."""
    mine = sorted((r for r in rows if r["shape"] == GOAL.label() and r["impl"] == "triton"),
                  key=lambda r: r["mode"] != "graph")

    def goal(text: str, key: str, ok: Callable[[float], bool]) -> dict:
        best = next((r for r in mine if key in r), None)
        if best is None:
            return {"goal": text, "value": None, "mode": None,
                    "status": "not assessed (a CUDA goal)"}
        return {"goal": text, "value": best[key], "mode": best["mode"],
                "status": "met" if ok(best[key]) else "not met"}

    where = GOAL.label()
    return [goal(f"triton >= {GOAL_VS_SDPA:g}x faster than SDPA with a dense mask, {where}",
                 "vs_sdpa", lambda x: x >= GOAL_VS_SDPA),
            goal(f"triton <= {GOAL_VS_FA2:g}x the time of FA2 plain decode over the same "
                 f"prefix, {where}", "over_fa2_decode", lambda x: x <= GOAL_VS_FA2)]


# ---- output ---------------------------------------------------------------------------------


def markdown(report: dict) -> str:
    lines = [
        f"# fastdecode tree attention on {report['device']}",
        "",
        f"torch {report['torch']}, triton {report['triton']}, fastdecode {report['fastdecode']}, "
        f"{report['date']}; median over {report['plan']['repeats']} rounds of up to "
        f"{report['plan']['max_iters']} calls. `vs SDPA`: SDPA's time (same mode) over the "
        "row's; `÷ FA2 decode`: the row's time over that of plain decoding (one query token) "
        "over the same prefix with SDPA's FlashAttention-2 backend; `graph` rows replay a "
        "captured CUDA graph. `splits`: the triton launcher's split-KV slices. `max abs err`: "
        "against the torch reference (`-`: a decode baseline, not comparable).",
        "",
        "Third-party baselines: " + ", ".join(
            f"{name} {version or 'not installed'}"
            for name, version in report["third_party"].items()) + ".",
        "",
        "| shape | impl | mode | median µs | vs SDPA | ÷ FA2 decode | splits | max abs err |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in report["rows"]:
        if "error" in r:
            timing = "failed: " + r["error"].replace("|", "/").splitlines()[0]
        else:
            timing = fmt_us(r["median_us"])
        ratio = f"{r['vs_sdpa']:.2f}×" if "vs_sdpa" in r else "-"
        over = f"{r['over_fa2_decode']:.2f}×" if "over_fa2_decode" in r else "-"
        err = "-" if r["max_abs_err"] is None else f"{r['max_abs_err']:.1e}"
        lines.append(f"| {r['shape']} | {r['impl']} | {r['mode']} | {timing} | {ratio} | "
                     f"{over} | {r.get('splits', '')} | {err} |")
    lines += ["", "## Goals", "", "| goal | measured | status |", "| --- | --- | --- |"]
    for g in report["goals"]:
        value = "-" if g["value"] is None else f"{g['value']:.2f}× ({g['mode']})"
        lines.append(f"| {g['goal']} | {value} | {g['status']} |")
    return "\n".join(lines) + "\n"


def installed_version(name: str) -> str | None:
    """The version of the package ``name`` when it imports, else None."""
    module = optional(name)
    return None if module is None else str(getattr(module, "__version__", "installed"))


def plot(report: dict, path: Path) -> Path | None:
    """µs against T, one panel per heads/B/prefix setting, one line per implementation and
    mode; None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    groups: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for r in report["rows"]:
        if "median_us" not in r:
            continue
        p = r["params"]
        panel = f"Hq={p['Hq']} Hkv={p['Hkv']} B={p['B']} prefix={p['prefix']}"
        groups.setdefault(panel, {}).setdefault(f"{r['impl']} {r['mode']}", []).append(
            (p["T"], r["median_us"]))
    cols = min(4, len(groups))
    rows = math.ceil(len(groups) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    for ax, (panel, lines) in zip(axes.flat, groups.items()):
        for label, points in sorted(lines.items()):
            points.sort()
            ax.plot([t for t, _ in points], [us for _, us in points], marker="o", label=label)
        ax.set_title(panel, fontsize=9)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("T (tree tokens)")
        ax.set_ylabel("µs")
    for ax in list(axes.flat)[len(groups):]:
        ax.set_visible(False)
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"tree attention on {report['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---- main -----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return _report.parse(_report.parser(__doc__, "fewer shapes, shorter rounds"), argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    plan = Plan(repeats=5, max_iters=10, target_s=0.005) if args.quick or device.type != "cuda" \
        else Plan()
    if device.type != "cuda":
        print("CPU: a tiny smoke configuration only; tree attention is a GPU kernel")
    gen = torch.Generator().manual_seed(0)
    rows = []
    for shape in shapes(device, args.quick):
        new = time_shape(shape, device, plan, gen)
        rows += new
        print(f"{shape.label():<50} " + "  ".join(
            f"{r['impl']}/{r['mode']}: "
            + (fmt_us(r["median_us"]) if "median_us" in r else "failed") for r in new), flush=True)
    add_ratios(rows)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    report = {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": triton_version,
        "fastdecode": fastdecode.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "plan": asdict(plan),
        "third_party": {name: installed_version(name) for name in ("flash_attn", "flashinfer")},
        "rows": rows,
        "goals": goals(rows),
    }
    folder, also = _report.folders(args.out, RESULTS / device_slug(device))
    png = plot(report, folder / f"{NAME}.png")
    if png is None:
        print("matplotlib is not installed: no plot")
    _report.save(NAME, report, markdown(report), folder, also, [png] if png else [])
    for g in report["goals"]:
        print(f"goal: {g['goal']}: {g['status']}")


if __name__ == "__main__":
    main()
