"""fastdecode's trie proposer inside vLLM against vLLM's own drafters, on the same engine.

Every method runs the same workloads on its own engine (one child process each, the default
model in fp32, eager): the built-in prompt set (12 single-turn prompts) and a multi-turn agentic
workload (16 two-turn sessions editing the same code or document), each at 1, 4 and 16 sessions
in flight (the built-in set has all 12 in flight at 16). Methods: no speculation, vLLM's
``ngram`` at 4 and 8 drafts, vLLM's ``suffix`` (arctic-inference) at 8, and fastdecode's
``TrieProposer`` at 8. Columns: output tokens/s, mean tokens per decode step of a request (1 +
accepted drafts), draft tokens per step and the share accepted, the speedup in tokens/s over no
speculation, and the sessions whose outputs are identical to no speculation's (greedy). The
machine's speed drifts, so ``--repeats`` passes run every method, every other pass in reverse
order, and each cell takes its fastest pass (no speculation's included).

Run in the vLLM environment: ``make vllm-bench`` (or ``.venv-vllm/bin/python
bench/vllm_e2e.py``). Results: ``bench/results/<device>/vllm_e2e.{json,md,png}``.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

import _report
from _report import RESULTS, device_name, device_slug

import fastdecode
from fastdecode._version import installed_version
from fastdecode.integrations import vllm_driver

GOALS = ("identical outputs on 100% of sessions; fastdecode's tokens/s at or above suffix's in "
         "every workload and concurrency, and at least 1.2x the better ngram's; at "
         "concurrency 16 never below no speculation")


def markdown(report: dict) -> str:
    lines = [f"# vLLM speculative decoding: fastdecode against vLLM's drafters ({report['device']})",
             "",
             f"vLLM {report['vllm']}, torch {report['torch']}, fastdecode {report['fastdecode']}, "
             f"arctic-inference {report['arctic_inference']}; {report['model']}, fp32, eager, "
             f"greedy; {report['date']}. Each cell: the fastest of {report.get('repeats', 1)} "
             "pass(es) over every method (every other pass in reverse method order, each "
             "method on a new engine per pass). Tokens/s: all output tokens over the run's "
             "wall time; tok/step: mean tokens per decode step of a request (1 + accepted "
             "drafts); drafted/step: draft tokens verified per decode step of a request, "
             "accepted: the share of them accepted (vLLM's counters); speedup: over the "
             "fastest pass of no speculation; identical: sessions with exactly the tokens of "
             "no speculation in every pass.", ""]
    for workload in report["workloads"]:
        lines += [f"## {workload}", "",
                  "| in flight | method | tokens/s | tok/step | drafted/step | accepted | speedup "
                  "| identical |",
                  "|---|---|---|---|---|---|---|---|"]
        for row in report["rows"]:
            if row["workload"] != workload:
                continue
            lines.append(f"| {row['concurrency']} | {row['method']} | "
                         f"{row['tokens_per_s']:.1f} | {row['tokens_per_step']:.2f} | "
                         f"{row['drafted_per_step']:.2f} | {100 * row['accepted_share']:.0f}% | "
                         f"{row['speedup']:.2f}x | {row['identical']}/{row['sessions']} |")
        lines.append("")
    lines += ["## Goals", "", GOALS + ".", ""]
    lines += [f"- {g['goal']}: {'met' if g['met'] else 'not met'} ({g['detail']})"
              for g in report["goals"]]
    return "\n".join(lines) + "\n"


def fastest_rows(passes: dict[str, list[dict]]) -> list[dict]:
    """One row per method, workload and concurrency from every method's passes (its results
    per pass, ``none`` among them): the fastest pass's figures against the fastest pass of no
    speculation, ``identical`` the fewest sessions identical to no speculation in any pass,
    ``seconds_all_passes`` every pass's wall seconds, and for fastdecode the proposer's stats
    of the fastest pass (its engine step-cost fit, its choices)."""
    def cells(method: str) -> dict[tuple, list[dict]]:
        out: dict[tuple, list[dict]] = {}
        for result in passes[method]:
            for run in result["runs"]:
                out.setdefault((run["workload"], run["concurrency"]), []).append(run)
        return out

    base = {k: min(runs, key=lambda r: r["seconds"]) for k, runs in cells("none").items()}
    rows = []
    for method in passes:
        for key, runs in cells(method).items():
            summaries = [vllm_driver.summarize(r, base[key]) for r in runs]
            fastest = min(range(len(runs)), key=lambda i: runs[i]["seconds"])
            best = runs[fastest]
            row = {"method": method, **summaries[fastest]}
            row["identical"] = min(s["identical"] for s in summaries)
            row["seconds_all_passes"] = [r["seconds"] for r in runs]
            if method == "fastdecode" and best.get("drafter_stats"):
                row["proposer"] = best["drafter_stats"]
            rows.append(row)
    return rows


def goals(rows: list[dict]) -> list[dict]:
    """Each goal of :data:`GOALS`, met or not, with the figures that decide it."""
    cell = {(r["workload"], r["concurrency"], r["method"]): r for r in rows}
    keys = sorted({(r["workload"], r["concurrency"]) for r in rows})
    out = []
    same = [r for r in rows if r["identical"] != r["sessions"]]
    out.append({"goal": "identical outputs", "met": not same,
                "detail": "all sessions" if not same else ", ".join(
                    f"{r['method']} {r['workload']} c={r['concurrency']}: "
                    f"{r['identical']}/{r['sessions']}" for r in same)})
    fd = {k: cell.get(k + ("fastdecode",)) for k in keys}
    for rival, factor in (("suffix", 1.0), ("ngram", 1.2)):
        worst, detail = None, []
        for k in keys:
            if fd[k] is None:
                continue
            if rival == "ngram":
                others = [cell[k + (m,)] for m in ("ngram4", "ngram8") if k + (m,) in cell]
            else:
                others = [cell[k + (rival,)]] if k + (rival,) in cell else []
            if not others:
                continue
            ratio = fd[k]["tokens_per_s"] / max(o["tokens_per_s"] for o in others)
            detail.append(f"{k[0]} c={k[1]} {ratio:.2f}x")
            worst = ratio if worst is None else min(worst, ratio)
        if worst is not None:
            out.append({"goal": f"fastdecode >= {factor}x {rival}", "met": worst >= factor,
                        "detail": ", ".join(detail)})
    at16 = [fd[k] for k in keys if k[1] == max(vllm_driver.CONCURRENCY) and fd[k]]
    if at16:
        out.append({"goal": "fastdecode >= no speculation at 16 in flight",
                    "met": all(r["speedup"] >= 1.0 for r in at16),
                    "detail": ", ".join(f"{r['workload']} {r['speedup']:.2f}x" for r in at16)})
    return out


def chart(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = report["workloads"]
    fig, axes = plt.subplots(1, len(workloads), figsize=(6 * len(workloads), 4), squeeze=False)
    methods = [m for m in report["methods"] if m != "none"]
    for ax, workload in zip(axes[0], workloads):
        rows = [r for r in report["rows"] if r["workload"] == workload]
        levels = sorted({r["concurrency"] for r in rows})
        width = 0.8 / len(methods)
        for j, method in enumerate(methods):
            ys = [next((r["speedup"] for r in rows if r["method"] == method
                        and r["concurrency"] == c), 0.0) for c in levels]
            ax.bar([i + j * width for i in range(len(levels))], ys, width, label=method)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(levels))], [str(c) for c in levels])
        ax.set_xlabel("sessions in flight")
        ax.set_ylabel("tokens/s over no speculation")
        ax.set_title(workload)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"vLLM speculative decoding, {report['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    import sys

    from fastdecode.models import default_model_dir

    parser = _report.parser(__doc__, "the built-in prompts only, at 1 and 16 in flight")
    parser.add_argument("--methods", default=",".join(vllm_driver.METHODS))
    parser.add_argument("--model", type=Path, default=default_model_dir())
    parser.add_argument("--repeats", type=int, default=2,
                        help="passes over every method, every other one in reverse order; each "
                        "cell reports its fastest pass (default 2; --quick: 1)")
    args = _report.parse(parser, argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, found {args.repeats}")
    if vllm_driver.vllm_version() is None:
        parser.error("vLLM is not installed here: run it in .venv-vllm (make vllm-bench)")
    try:
        methods = vllm_driver.methods_to_run(args.methods)
    except ValueError as e:
        parser.error(f"--{e}")
    workloads = ["builtin"] if args.quick else list(vllm_driver.WORKLOADS)
    levels = (1, 16) if args.quick else vllm_driver.CONCURRENCY
    device = torch.device(args.device)
    repeats = 1 if args.quick else args.repeats
    passes: dict[str, list[dict]] = {m: [] for m in methods}
    with tempfile.TemporaryDirectory() as tmp:
        for p in range(repeats):
            for method in methods if p % 2 == 0 else methods[::-1]:
                passes[method].append(vllm_driver.run_method(
                    sys.executable, method, str(args.model), Path(tmp) / f"{method}{p}.json",
                    ",".join(workloads), ",".join(map(str, levels))))
    rows = fastest_rows(passes)
    report = {"device": device_name(device),
              "vllm": vllm_driver.vllm_version(),
              "torch": torch.__version__, "fastdecode": fastdecode.__version__,
              "arctic_inference": installed_version("arctic-inference"), "model": args.model.name,
              "date": time.strftime("%Y-%m-%d %H:%M"), "methods": methods, "repeats": repeats,
              "workloads": workloads, "rows": rows}
    report["goals"] = goals(rows)
    folder, also = _report.folders(args.out, RESULTS / device_slug(device))
    png = folder / "vllm_e2e.png"
    chart(report, png)
    _report.save("vllm_e2e", report, markdown(report), folder, also, [png])
    print(markdown(report))


if __name__ == "__main__":
    main()
