"""Benchmark of ``fastdecode.ops.small_linear`` (the CPU fp32 linear for a few rows) against
``torch.nn.functional.linear`` (BLAS sgemm), on one thread, and of what it does to the default
model's forward cost against the number of draft tokens.

Linear rows: the layer shapes of SmolLM2-135M (q/o 576x576, k/v 192x576, gate/up 1536x576,
down 576x1536, lm_head 49152x576) for M = 1, 2, 3, 4, 6, 8, 12, 16 rows. Weights are streamed
from memory as in a real forward: each timed round calls the layer once on each of enough weight
copies to exceed the 32 MB L3 (at least 96 MB), and reports the time per call. Both columns
are the public calls (small_linear's includes its Python argument checks and dispatch, about
10 µs). Each result is first checked against F.linear.

Forward rows (when the default model, SmolLM2-135M-Instruct, is available from
``fastdecode.models.default.load_default``'s cache): one tree forward of T = 1, 2, 3, 4, 6, 8,
12, 16 chain tokens through ``fastdecode.hf.TreeRunner`` after a 200-token prefill, stock and
under ``fastdecode.hf.use_cpu_linears``, as ms and as a ratio to T = 1.

Usage: python bench/cpu_linear.py [--out DIR] [--quick]   (run it pinned: taskset -c 1 ...)
Writes cpu_linear.json, cpu_linear.md and cpu_linear.png into DIR (default
bench/results/<device slug>/), and copies them into $OUT when that is set and --out is not
given.
"""

from __future__ import annotations

import datetime
import math
import os
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

import fastdecode
from fastdecode.ops import small_linear
from fastdecode.ops.linear import small_linear_isa

import _report
from _report import RESULTS, device_name, device_slug, fmt_us
from _timing import Plan, host_clock, measure

NAME = "cpu_linear"
# (name, N, K) of SmolLM2-135M's linears.
SHAPES = (("q/o", 576, 576), ("k/v", 192, 576), ("gate/up", 1536, 576), ("down", 576, 1536),
          ("lm_head", 49152, 576))
ROWS = (1, 2, 3, 4, 6, 8, 12, 16)
TOKENS = (1, 2, 3, 4, 6, 8, 12, 16)
STREAM_BYTES = 96 * 2**20  # > 32 MB L3, three times over
PREFILL = 200


def linear_rows(shapes, rows, plan: Plan) -> list[dict]:
    out = []
    gen = torch.Generator().manual_seed(0)
    for name, N, K in shapes:
        nbytes = N * K * 4
        copies = max(2, math.ceil(STREAM_BYTES / nbytes))
        weights = [torch.randn(N, K, generator=gen) / math.sqrt(K) for _ in range(copies)]
        for M in rows:
            x = torch.randn(M, K, generator=gen)
            torch.testing.assert_close(small_linear(x, weights[0]), F.linear(x, weights[0]),
                                       rtol=1e-4, atol=1e-4)

            def stock() -> None:
                for w in weights:
                    F.linear(x, w)

            def ours() -> None:
                for w in weights:
                    small_linear(x, w)

            t_stock = measure(stock, host_clock, plan)
            t_ours = measure(ours, host_clock, plan)
            us_stock, us_ours = t_stock.median_us / copies, t_ours.median_us / copies
            out.append({
                "layer": name, "N": N, "K": K, "M": M, "weight_mb": nbytes / 1e6,
                "copies": copies, "f_linear_us": us_stock, "small_linear_us": us_ours,
                "ratio": us_ours / us_stock,
                "small_linear_gb_s": nbytes / us_ours / 1e3,
                "f_linear_min_us": t_stock.min_us / copies,
                "small_linear_min_us": t_ours.min_us / copies,
                "repeats": t_ours.repeats,
            })
            print(f"{name:8s} M={M:2d}  F.linear {fmt_us(us_stock):>8s} µs  small_linear "
                  f"{fmt_us(us_ours):>8s} µs  ratio {us_ours / us_stock:.2f}", flush=True)
        del weights
    return out


def forward_rows(tokens, plan: Plan) -> tuple[list[dict], str | None]:
    """The default model's tree-forward cost against T, stock and with use_cpu_linears; an
    empty list and the reason when the model is not available."""
    try:
        from fastdecode.hf import TreeRunner, use_cpu_linears
        from fastdecode.models.default import load_default

        model, _ = load_default()
    except Exception as e:  # noqa: BLE001 - any failure to load means: skip, say why
        return [], f"{type(e).__name__}: {e}"
    model.eval()
    runner = TreeRunner(model)
    ids = torch.randint(0, 1000, (1, PREFILL), generator=torch.Generator().manual_seed(1))
    rows = []
    with torch.inference_mode():
        runner.prefill(ids, torch.ones_like(ids))
        for T in tokens:
            parents = (torch.arange(T) - 1)[None]
            feed = ids[:, :T].contiguous()

            def step() -> None:
                runner.forward(feed, parents)
                runner.cache.crop(-T)

            stock = measure(step, host_clock, plan)
            with use_cpu_linears(model):
                patched = measure(step, host_clock, plan)
            rows.append({"T": T, "stock_ms": stock.median_us / 1e3,
                         "small_linear_ms": patched.median_us / 1e3})
            print(f"forward T={T:2d}  stock {stock.median_us / 1e3:6.1f} ms  use_cpu_linears "
                  f"{patched.median_us / 1e3:6.1f} ms", flush=True)
    for r in rows:
        r["stock_ratio_to_T1"] = r["stock_ms"] / rows[0]["stock_ms"]
        r["small_linear_ratio_to_T1"] = r["small_linear_ms"] / rows[0]["small_linear_ms"]
        r["small_linear_over_stock"] = r["small_linear_ms"] / r["stock_ms"]
    return rows, None


def markdown(report: dict) -> str:
    lines = [
        f"# CPU fp32 linear for a few rows on {report['device']}",
        "",
        f"torch {report['torch']}, fastdecode {report['fastdecode']}, {report['date']}; "
        f"{report['note']}. small_linear path: {report['isa']}.",
        "",
        "One thread (torch.set_num_threads(1)). Weights streamed from memory: each round calls "
        "the layer on enough weight copies to exceed 96 MB (the L3 is 32 MB); times are medians "
        "per call of the public calls (small_linear's include its Python checks and dispatch, "
        "about 10 µs). ratio = small_linear / F.linear (below 1: small_linear is faster).",
        "",
        "## Linear layers (SmolLM2-135M shapes)",
        "",
        "| layer | N x K | MB | M | F.linear µs | small_linear µs | ratio | small_linear GB/s |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in report["linear"]:
        lines.append(f"| {r['layer']} | {r['N']}x{r['K']} | {r['weight_mb']:.1f} | {r['M']} | "
                     f"{fmt_us(r['f_linear_us'])} | {fmt_us(r['small_linear_us'])} | "
                     f"{r['ratio']:.2f} | {r['small_linear_gb_s']:.1f} |")
    lines += ["", "## Default model forward against draft tokens", ""]
    if not report["forward"]:
        lines.append(f"Not measured: {report['forward_skipped']}")
    else:
        lines += [
            f"SmolLM2-135M-Instruct (fp32), one tree forward of T chain tokens through TreeRunner "
            f"after a {PREFILL}-token prefill; stock against fastdecode.hf.use_cpu_linears.",
            "",
            "| T | stock ms | stock / T=1 | use_cpu_linears ms | use_cpu_linears / T=1 | "
            "use_cpu_linears / stock |",
            "| ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in report["forward"]:
            lines.append(f"| {r['T']} | {r['stock_ms']:.1f} | {r['stock_ratio_to_T1']:.2f} | "
                         f"{r['small_linear_ms']:.1f} | {r['small_linear_ratio_to_T1']:.2f} | "
                         f"{r['small_linear_over_stock']:.2f} |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> Path | None:
    """Forward cost against T (ms and ratio to T=1), and the linear layers' ratio against M."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    fwd = report["forward"]
    for key, label in (("stock", "stock F.linear"), ("small_linear", "use_cpu_linears")):
        if fwd:
            Ts = [r["T"] for r in fwd]
            axes[0].plot(Ts, [r[f"{key}_ms"] for r in fwd], marker="o", label=label)
            axes[1].plot(Ts, [r[f"{key}_ratio_to_T1"] for r in fwd], marker="o", label=label)
    for ax, ylabel in ((axes[0], "forward ms"), (axes[1], "forward cost / T=1")):
        ax.set_xlabel("draft tokens T")
        ax.set_ylabel(ylabel)
        if fwd:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "default model not available", ha="center",
                    transform=ax.transAxes)
    layers: dict[str, list] = {}
    for r in report["linear"]:
        layers.setdefault(f"{r['layer']} {r['N']}x{r['K']}", []).append((r["M"], r["ratio"]))
    for label, points in layers.items():
        axes[2].plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    axes[2].axhline(1.0, color="grey", lw=0.8)
    axes[2].set_xlabel("rows M")
    axes[2].set_ylabel("small_linear / F.linear time")
    axes[2].legend(fontsize=7)
    fig.suptitle(f"small_linear on {report['device']}, 1 thread ({report['isa']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    p = _report.parser(__doc__, "fewer shapes, row counts and repeats",
                       device_help="cpu only (the op is a CPU kernel)")
    args = _report.parse(p, argv)
    if args.device != "cpu":
        p.error("--device: this benchmark runs on the CPU only")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    shapes = SHAPES[2:] if args.quick else SHAPES
    rows = (1, 8) if args.quick else ROWS
    tokens = (1, 8) if args.quick else TOKENS
    lin_plan = Plan(repeats=5 if args.quick else 9, max_iters=4, target_s=0.05, warmup=1)
    fwd_plan = Plan(repeats=3 if args.quick else 7, max_iters=1, target_s=0.0, warmup=2)
    linear = linear_rows(shapes, rows, lin_plan)
    forward, skipped = forward_rows(tokens, fwd_plan)
    pinned = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    device = torch.device("cpu")
    report = {
        "device": device_name(device), "device_type": "cpu", "torch": torch.__version__,
        "fastdecode": fastdecode.__version__, "isa": small_linear_isa(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "note": (f"1 thread, pinned to cores {pinned}; another job may have run on the "
                 "machine's other core meanwhile (shared L3 and memory bandwidth)"),
        "cores": pinned, "linear_plan": asdict(lin_plan), "forward_plan": asdict(fwd_plan),
        "linear": linear, "forward": forward, "forward_skipped": skipped,
    }
    folder, also = _report.folders(args.out, RESULTS / device_slug(device))
    png = plot(report, folder / f"{NAME}.png")
    _report.save(NAME, report, markdown(report), folder, also, [png] if png else [])


if __name__ == "__main__":
    main()
