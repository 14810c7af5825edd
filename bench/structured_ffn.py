"""Benchmark of the structured feed-forward layers (``fastdecode.nn.StructuredFFN``) against a
dense FFN and a dense ``nn.Linear`` (cuBLAS on the GPU, MKL/OpenBLAS on the CPU).

The FFN is the paper's: width d, hidden 4d, GELU (tanh), no bias, both projections structured
alike. Parameter ratios of the FFN to dense: 62.5% (LowRank r = d/2, BlockShuffle b = 2,
BlockDense b = 4, r = 4d/5 rounded to 64) and 31.25% (r = d/4, b = 4, r = 2d/5).

Sections (each row carries its time and the ratio ``vs dense`` = dense time / row time, so above
1 is faster than dense):

* ``prefill``: a no-grad forward on T tokens (the paper's Fig. 4/5 measurement), unmerged:
  the module's own path (on CUDA the decoding kernels for T <= 16, else the structured
  product);
* ``train``: forward + backward on T tokens;
* ``linear``: one d -> 4d projection against ``nn.Linear`` at the largest T;
* ``swiglu``: a LLaMA-shaped SwiGLU FFN (CUDA: d 4096, f 11008, T 8192; LowRank r = 1024,
  31.2%) with gate and up as ONE structured layer: forward through the fused up-projection
  kernel and through plain torch, and a training step;
* ``decode``: T in {1, 8} tokens, no grad: the structured decoding kernels (``structured``),
  the pre-merged dense weight (``merged``) and the dense FFN, eager and (CUDA) replayed from a
  CUDA graph. ``GB/s`` = weight bytes read / time, and ``of copy`` its share of the measured
  device copy bandwidth (a large tensor copy: bytes read + written over time).

On CUDA, BlockShuffle forward rows are also timed on the plain-torch backend (``[torch]``,
batched GEMMs and permutation copies) beside the default fused Triton kernel.

On CUDA (bf16), most important first: decode at widths 5120 and 2048, the forward at width
5120 with T in {1, 16, 256, 2048, 30720}, training at T = 8192, the SwiGLU section, the one
projection, then the forward at width 2048 (same T) and at widths 4096 and 6144 (T = 30720);
the run stops adding sections past a 60 s budget (``make gpu-check`` runs every benchmark in
one call) and lists what it skipped. On the CPU (fp32): widths 256 and 512, T up to 2048.
``--quick``: fewer shapes.

Usage: python bench/structured_ffn.py [--device cpu|cuda] [--out DIR] [--quick]
Writes structured_ffn.json, structured_ffn.md and structured_ffn.png into DIR (default
bench/results/<device slug>/), and copies them into $OUT when that is set and --out is not
given.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch

import fastdecode
from fastdecode import use_backend
from fastdecode.nn.ffn import StructuredFFN

import _report
from _report import RESULTS, device_name, device_slug, fmt_us
from _timing import Plan, capture_graph, cuda_clock, host_clock, measure

NAME = "structured_ffn"
BUDGET_S = 60.0


def configs(d: int) -> list[dict]:
    """The FFN structures at width d: dense, then each kind at about 62.5% and 31.25%."""
    def bd_rank(frac: float) -> int:
        return max(64, round(frac * d / 64) * 64)

    return [
        dict(kind="dense"),
        dict(kind="lowrank", rank=d // 2), dict(kind="lowrank", rank=d // 4),
        dict(kind="blockdense", rank=bd_rank(0.8), blocks=4),
        dict(kind="blockdense", rank=bd_rank(0.4), blocks=4),
        dict(kind="blockshuffle", blocks=2), dict(kind="blockshuffle", blocks=4),
    ]


def label(cfg: dict) -> str:
    extra = ", ".join(f"{k[0]}={v}" for k, v in cfg.items() if k != "kind")
    return cfg["kind"] + (f" ({extra})" if extra else "")


def build(d: int, cfg: dict, device: torch.device, dtype: torch.dtype) -> StructuredFFN:
    args = {k: v for k, v in cfg.items() if k != "kind"}
    return StructuredFFN(d, 4 * d, cfg["kind"], activation="gelu", device=device, dtype=dtype,
                         **args)


class Runner:
    """Times calls on the device's clock and keeps the rows; stops taking work past the
    budget."""

    def __init__(self, device: torch.device, plan: Plan, budget_s: float) -> None:
        self.device, self.plan = device, plan
        self.clock = cuda_clock if device.type == "cuda" else host_clock
        self.t0, self.budget_s = time.perf_counter(), budget_s
        self.rows: list[dict] = []
        self.skipped: list[str] = []

    def over_budget(self, what: str) -> bool:
        if time.perf_counter() - self.t0 > self.budget_s:
            self.skipped.append(what)
            return True
        return False

    def time(self, fn: Callable[[], object], **row) -> dict:
        timing = measure(fn, self.clock, self.plan)
        row.update(median_us=timing.median_us, min_us=timing.min_us)
        self.rows.append(row)
        print(f"{row['section']:<8} d={row['width']:<5} T={row['tokens']:<6} "
              f"{row['impl']:<28} {row.get('path', ''):<10} {row.get('mode', ''):<8} "
              f"{fmt_us(timing.median_us)} µs",
              flush=True)
        return row

    def graph(self, fn: Callable[[], object], **row) -> dict | None:
        try:
            graph = capture_graph(fn)
        except Exception as e:  # a failed capture is a result, not a crash
            torch.cuda.synchronize()
            row.update(error=f"{type(e).__name__}: {e}".splitlines()[0])
            self.rows.append(row)
            return None
        return self.time(graph.replay, **row)


def copy_bandwidth(runner: Runner) -> float | None:
    """The device's copy bandwidth in GB/s (bytes read + written), from a 1 GiB (CUDA) copy;
    None on the CPU."""
    if runner.device.type != "cuda":
        return None
    src = torch.empty(2**29, dtype=torch.bfloat16, device=runner.device)
    dst = torch.empty_like(src)
    timing = measure(lambda: dst.copy_(src), cuda_clock, runner.plan)
    return 2 * src.numel() * 2 / (timing.median_us * 1e-6) / 1e9


def backends(cfg: dict, device: torch.device) -> list[str | None]:
    """The backends to time: the default choice, plus the plain-torch one for BlockShuffle
    where the default is a Triton kernel."""
    if cfg["kind"] == "blockshuffle" and device.type == "cuda":
        return [None, "torch"]
    return [None]


def prefill(runner: Runner, d: int, tokens: list[int], dtype: torch.dtype) -> None:
    for cfg in configs(d):
        if runner.over_budget(f"prefill d={d} {label(cfg)}"):
            return
        ffn = build(d, cfg, runner.device, dtype).eval()
        for T in tokens:
            x = torch.randn(T, d, device=runner.device, dtype=dtype)
            for backend in backends(cfg, runner.device):
                with torch.no_grad(), forced(backend):
                    runner.time(lambda: ffn(x), section="prefill", width=d, tokens=T,
                                impl=label(cfg) + (f" [{backend}]" if backend else ""),
                                kind=cfg["kind"], mode="eager", params=ffn.num_params)
        del ffn


def forced(backend: str | None):
    return use_backend(backend) if backend else contextlib.nullcontext()


def swiglu(runner: Runner, d: int, f: int, rank: int, T: int, dtype: torch.dtype) -> None:
    """A LLaMA-shaped SwiGLU FFN: dense against LowRank with gate and up fused into one
    ``d -> 2f`` layer, forward through the fused up-projection kernel (default backend) and
    through plain torch, and a training step."""
    for kind in ("dense", "lowrank"):
        if runner.over_budget(f"swiglu {kind}"):
            return
        ffn = StructuredFFN(d, f, kind, rank=rank if kind == "lowrank" else None,
                            device=runner.device, dtype=dtype)
        impl = "dense SwiGLU" if kind == "dense" else f"lowrank SwiGLU (r={rank})"
        x = torch.randn(T, d, device=runner.device, dtype=dtype)
        base = dict(section="swiglu", width=d, tokens=T, kind=kind, params=ffn.num_params,
                    dense_params=3 * d * f)
        for backend in [None] + (["torch"] if kind == "lowrank" and x.is_cuda else []):
            with torch.no_grad(), forced(backend):
                runner.time(lambda: ffn(x), impl=impl + (f" [{backend}]" if backend else ""),
                            mode="eager", **base)
        xg = x.clone().requires_grad_()
        gy = torch.randn_like(x)
        runner.time(lambda: ffn(xg).backward(gy), impl=impl, mode="fwd+bwd", **base)
        del ffn, x, xg, gy


def train(runner: Runner, d: int, T: int, dtype: torch.dtype) -> None:
    for cfg in configs(d):
        if runner.over_budget(f"train d={d} {label(cfg)}"):
            return
        ffn = build(d, cfg, runner.device, dtype).train()
        x = torch.randn(T, d, device=runner.device, dtype=dtype, requires_grad=True)
        gy = torch.randn(T, d, device=runner.device, dtype=dtype)
        runner.time(lambda: ffn(x).backward(gy), section="train", width=d, tokens=T,
                    impl=label(cfg), kind=cfg["kind"], mode="fwd+bwd", params=ffn.num_params)
        del ffn, x, gy


def linear(runner: Runner, d: int, T: int, dtype: torch.dtype) -> None:
    for cfg in configs(d):
        if runner.over_budget(f"linear d={d} {label(cfg)}"):
            return
        fc1 = build(d, cfg, runner.device, dtype).fc1
        x = torch.randn(T, d, device=runner.device, dtype=dtype)
        impl = "nn.Linear" if cfg["kind"] == "dense" else label(cfg)
        with torch.no_grad():
            runner.time(lambda: fc1(x), section="linear", width=d, tokens=T, impl=impl,
                        kind=cfg["kind"], mode="eager",
                        params=fc1.weight.numel() if cfg["kind"] == "dense" else fc1.num_params)
        del fc1


def decode(runner: Runner, d: int, dtype: torch.dtype, copy_gbs: float | None) -> None:
    elem = torch.finfo(dtype).bits // 8
    for cfg in configs(d):
        if runner.over_budget(f"decode d={d} {label(cfg)}"):
            return
        ffn = build(d, cfg, runner.device, dtype).eval()
        modes = ["structured", "merged"] if cfg["kind"] != "dense" else ["dense"]
        for mode in modes:
            if mode == "merged":
                ffn.merge()
            params = ffn.num_params if mode == "structured" else 8 * d * d
            for T in (1, 8):
                x = torch.randn(T, d, device=runner.device, dtype=dtype)
                with torch.no_grad():
                    base = dict(section="decode", width=d, tokens=T, impl=label(cfg),
                                kind=cfg["kind"], path=mode, params=params,
                                bytes=params * elem)
                    rows = [runner.time(lambda: ffn(x), mode="eager", **base)]
                    if runner.device.type == "cuda":
                        rows.append(runner.graph(lambda: ffn(x), mode="graph", **base))
                for r in rows:
                    if r is not None and "median_us" in r:
                        r["gbs"] = r["bytes"] / (r["median_us"] * 1e-6) / 1e9
                        if copy_gbs:
                            r["of_copy"] = r["gbs"] / copy_gbs
        del ffn


def add_ratios(rows: list[dict]) -> None:
    """``vs_dense``: the dense row's time (same section, width, tokens, mode) over the row's."""
    dense = {(r["section"], r["width"], r["tokens"], r["mode"]): r["median_us"]
             for r in rows if r["kind"] == "dense" and "median_us" in r}
    for r in rows:
        base = dense.get((r["section"], r["width"], r["tokens"], r["mode"]))
        if base and "median_us" in r:
            r["vs_dense"] = base / r["median_us"]
        dense_params = r.get("dense_params") or (4 * r["width"] ** 2 if r["section"] == "linear"
                                                 else 8 * r["width"] ** 2)
        r["param_ratio"] = r["params"] / dense_params


def check(device: torch.device, dtype: torch.dtype) -> None:
    """Every structure's structured, merged and (CUDA) decoding paths agree before timing."""
    d = 256
    tol = 5e-2 if dtype != torch.float32 else 1e-4
    for cfg in configs(d)[1:]:
        ffn = build(d, cfg, device, dtype).eval()
        x = torch.randn(8, d, device=device, dtype=dtype)
        with torch.no_grad():
            want = ffn(torch.cat([x, x[:ffn.fc1.merge_threshold + 1]]))[:8].float()
            outs = [ffn(x).float()]
            ffn.merge()
            outs.append(ffn(x).float())
        for got in outs:
            err = ((got - want).norm() / want.norm()).item()
            if not err < tol:
                raise AssertionError(f"{label(cfg)}: paths differ by {err:.3g} (> {tol})")


# ---- output ---------------------------------------------------------------------------------


def fmt_ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}×"


def markdown(report: dict) -> str:
    cpu = report["device_type"] != "cuda"
    lines = [
        f"# fastdecode structured FFN on {report['device']}",
        "",
        f"torch {report['torch']}, triton {report['triton']}, fastdecode {report['fastdecode']}, "
        f"{report['date']}, {report['dtype']}; median over {report['plan']['repeats']} rounds. "
        "FFN d -> 4d -> d with GELU; `params` is the FFN's share of dense parameters; "
        "`vs dense` is the dense FFN's (or nn.Linear's) time over the row's (above 1: faster).",
    ]
    if cpu:
        lines += ["", "Measured with `taskset -c 1` on 1 core, other jobs running: CPU times "
                  "are indicative only. On the CPU the structured path is plain torch (MKL/"
                  "OpenBLAS GEMMs); the Triton kernels run only on the GPU."]
    if report.get("copy_gbs"):
        lines += ["", f"Measured copy bandwidth: {report['copy_gbs']:.0f} GB/s."]
    if report.get("skipped"):
        lines += ["", "Skipped past the time budget: " + "; ".join(report["skipped"])]
    for section, title in (("prefill", "Forward (no grad), structured path"),
                           ("train", "Training step (forward + backward)"),
                           ("linear", "One d -> 4d projection against nn.Linear"),
                           ("swiglu", "SwiGLU FFN, gate and up as one structured layer"),
                           ("decode", "Decode")):
        rows = [r for r in report["rows"] if r["section"] == section]
        if not rows:
            continue
        lines += ["", f"## {title}", ""]
        if section == "decode":
            lines += ["| width | T | impl | path | mode | params | µs | vs dense | GB/s | "
                      "of copy |",
                      "| ---: | ---: | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
        elif section == "swiglu":
            lines += ["| width | T | impl | mode | params | µs | vs dense |",
                      "| ---: | ---: | --- | --- | ---: | ---: | ---: |"]
        else:
            lines += ["| width | T | impl | params | µs | vs dense |",
                      "| ---: | ---: | --- | ---: | ---: | ---: |"]
        for r in rows:
            us = fmt_us(r["median_us"]) if "median_us" in r else "failed: " + r.get("error", "")
            head = f"| {r['width']} | {r['tokens']} | {r['impl']} |"
            ratio = f"{r['param_ratio']:.1%}"
            if section == "decode":
                gbs = f"{r['gbs']:.1f}" if "gbs" in r else "-"
                share = f"{r['of_copy']:.0%}" if "of_copy" in r else "-"
                lines.append(f"{head} {r['path']} | {r['mode']} | {ratio} | {us} | "
                             f"{fmt_ratio(r.get('vs_dense'))} | {gbs} | {share} |")
            elif section == "swiglu":
                lines.append(f"{head} {r['mode']} | {ratio} | {us} | "
                             f"{fmt_ratio(r.get('vs_dense'))} |")
            else:
                lines.append(f"{head} {ratio} | {us} | {fmt_ratio(r.get('vs_dense'))} |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> Path | None:
    """Speed-up over dense against T (forward, one panel per swept width), and decode
    speed-ups; None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [r for r in report["rows"] if "vs_dense" in r and r["kind"] != "dense"]
    widths = sorted({r["width"] for r in rows if r["section"] == "prefill"
                     and sum(1 for q in rows if q["section"] == "prefill"
                             and q["width"] == r["width"] and q["impl"] == r["impl"]) > 1})
    panels = [("prefill", w) for w in widths] + [("decode", None)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8), squeeze=False)
    for ax, (section, width) in zip(axes.flat, panels):
        if section == "prefill":
            lines: dict[str, list[tuple[int, float]]] = {}
            for r in rows:
                if r["section"] == "prefill" and r["width"] == width:
                    lines.setdefault(r["impl"], []).append((r["tokens"], r["vs_dense"]))
            for impl, pts in sorted(lines.items()):
                pts.sort()
                ax.plot([t for t, _ in pts], [v for _, v in pts], marker="o", label=impl)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("tokens T")
            ax.set_title(f"forward, width {width}", fontsize=9)
        else:
            dec = [r for r in rows if r["section"] == "decode" and r["mode"] == "eager"]
            names = [f"d={r['width']} T={r['tokens']} {r['impl']} {r['path']}" for r in dec]
            ax.barh(range(len(dec)), [r["vs_dense"] for r in dec])
            ax.set_yticks(range(len(dec)), names, fontsize=5)
            ax.set_title("decode (eager)", fontsize=9)
        if section == "prefill":
            ax.axhline(1.0, color="grey", lw=0.8)
            ax.set_ylabel("speed-up over dense")
        else:
            ax.axvline(1.0, color="grey", lw=0.8)
    axes.flat[0].legend(fontsize=6)
    fig.suptitle(f"structured FFN vs dense on {report['device']} ({report['dtype']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---- main -----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return _report.parse(_report.parser(__doc__, "fewer widths and token counts"), argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    plan = Plan(repeats=5, max_iters=20, target_s=0.01)
    torch.manual_seed(0)
    runner = Runner(device, plan, BUDGET_S)
    check(device, dtype)
    copy_gbs = copy_bandwidth(runner)
    if cuda:
        # Most important first: the run stops adding sections past the budget.
        for d in ((5120,) if args.quick else (5120, 2048)):
            decode(runner, d, dtype, copy_gbs)
        sweep = [(5120, [16, 30720] if args.quick else [1, 16, 256, 2048, 30720])]
        if not args.quick:
            sweep += [(2048, [1, 16, 256, 2048, 30720]), (4096, [30720]), (6144, [30720])]
        prefill(runner, *sweep[0], dtype)
        train(runner, 5120, 8192, dtype)
        swiglu(runner, 4096, 11008, 1024, 8192, dtype)
        linear(runner, 5120, 30720, dtype)
        for d, tokens in sweep[1:]:
            prefill(runner, d, tokens, dtype)
    else:
        sweep = [(256, [1, 16, 256, 2048]), (512, [1, 16, 256, 2048])]
        if args.quick:
            sweep = [(256, [16, 256])]
        for d, tokens in sweep:
            prefill(runner, d, tokens, dtype)
        train(runner, 512, 512, dtype)
        linear(runner, 512, 2048, dtype)
        swiglu(runner, 512, 1376, 128, 512, dtype)
        decode(runner, 512, dtype, copy_gbs)
    add_ratios(runner.rows)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    report = {
        "device": device_name(device),
        "device_type": device.type,
        "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "triton": triton_version,
        "fastdecode": fastdecode.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "plan": asdict(plan),
        "copy_gbs": copy_gbs,
        "skipped": runner.skipped,
        "rows": runner.rows,
    }
    folder, also = _report.folders(args.out, RESULTS / device_slug(device))
    png = plot(report, folder / f"{NAME}.png")
    if png is None:
        print("matplotlib is not installed: no plot")
    _report.save(NAME, report, markdown(report), folder, also, [png] if png else [])


if __name__ == "__main__":
    main()
