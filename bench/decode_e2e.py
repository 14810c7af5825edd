"""End-to-end decoding benchmark: the default model (SmolLM2-135M-Instruct, fp32) on the built-in
prompt set (``fastdecode.models.prompts``: code, chat, retrieval, rewrite), per category:

  greedy     ``fastdecode.generate(strategy="greedy")``: the baseline of every ratio
  hf_greedy  transformers' ``model.generate`` greedy, for reference
  hf_stock   hf_greedy with torch's own linears (only with ``--linears fastdecode``, on the CPU)
  hf_lookup  transformers' prompt lookup decoding (``prompt_lookup_num_tokens=10``)
  jacobi     ``fastdecode.generate(strategy="jacobi")`` at N=5, W=G=7
  auto       ``strategy="jacobi", config="auto"`` with its default bounds
  trie       ``strategy="trie"`` at 16 nodes, depth 8 (a fresh trie of the prompt and output)
  trie_auto  ``strategy="trie", config="auto"`` with its default bounds (64 nodes, depth 12)
  trie_warm  trie_auto with one TrieCache kept per prompt across rounds (a repeated workload)
  fd_lookup  ``strategy="prompt_lookup"`` (the trie's best chain of 10 tokens)

With ``--linears fastdecode`` (the default) on the CPU, every row but hf_stock runs the model's
``nn.Linear`` layers through fastdecode's CPU kernel (:func:`fastdecode.hf.use_cpu_linears`),
transformers' rows included, so that every ratio compares strategies on the same kernels;
hf_stock shows what the kernel itself changes. ``--linears torch`` runs everything on torch's.
On CUDA the option changes nothing (the kernel is CPU-only).

Reported per category: tokens/s (all tokens over all seconds, each prompt's fastest of its
rounds, wall clock around the whole call; greedy and the two auto strategies, which the floor
goal compares, run ``--floor-rounds`` rounds, the others ``--rounds``), the step compression
(greedy's model forwards over the strategy's; transformers does not report its forwards, so its
rows have none), the speedup over greedy tokens/s, and whether every round's output equals greedy's, token for token.

Also the cost of one ``TreeRunner.forward`` against the tokens fed (chain trees) for the
default model after a 256-token prefill; and on CUDA, for a randomly initialised model of
Llama-7B shape in bf16 after a 512-token prefill, with the share of a decoding call's time
spent outside the model's forwards (``stats.overhead_s``) at that shape.

Usage: python bench/decode_e2e.py [--device cpu|cuda] [--out DIR] [--quick] [--threads N]
                                 [--rounds R] [--floor-rounds F] [--no-load | --floor-only]
                                 [--linears fastdecode|torch]
Writes decode_e2e.json, decode_e2e.md, decode_e2e.png and decode_e2e_curve.png (the plots need
matplotlib and are skipped with a note without it) into DIR (default
bench/results/<device slug>/), and also into $OUT when that is set and --out is not given.
``--floor-only`` runs just the pass under a competing load and writes decode_floor.json and
decode_floor.md instead.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import subprocess
import sys
import time
from pathlib import Path

import torch

import fastdecode

import _report
from _report import RESULTS, device_name, device_slug

W, N, G = 7, 5, 7
LOOKUP_TOKENS = 10
TRIE_NODES, TRIE_DEPTH = 16, 8
STRATEGIES = ("greedy", "hf_greedy", "hf_stock", "hf_lookup", "jacobi", "auto", "trie", "trie_auto",
              "trie_warm", "fd_lookup")
LABELS = {"greedy": "fastdecode greedy", "hf_greedy": "HF greedy",
          "hf_stock": "HF greedy, torch linears",
          "hf_lookup": f"HF prompt lookup ({LOOKUP_TOKENS})", "jacobi": f"jacobi N={N} W={W} G={G}",
          "auto": "jacobi auto", "trie": f"trie {TRIE_NODES} nodes, depth {TRIE_DEPTH}",
          "trie_auto": "trie auto", "trie_warm": "trie auto, cache kept (repeat)",
          "fd_lookup": f"fastdecode prompt_lookup ({LOOKUP_TOKENS})"}
CURVE_TOKENS = (1, 2, 4, 8, 16, 32, 64, 96, 128, 192, 256)
CURVE_PREFIX = 512
DEFAULT_CURVE_TOKENS = (1, 2, 3, 4, 5, 8, 16, 32, 64, 128)
DEFAULT_CURVE_PREFIX = 256
LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=32, vocab_size=32000)
OVERHEAD_PROMPT, OVERHEAD_TOKENS = 128, 32
# fastdecode.generate's arguments per fastdecode strategy.
SETTINGS = {"greedy": {"strategy": "greedy"},
            "jacobi": {"strategy": "jacobi", "window": W, "ngram": N, "guesses": G},
            "auto": {"strategy": "jacobi", "config": "auto"},
            "trie": {"strategy": "trie", "decoding_length": TRIE_NODES, "branch_length": TRIE_DEPTH},
            "trie_auto": {"strategy": "trie", "config": "auto"},
            "trie_warm": {"strategy": "trie", "config": "auto"},
            "fd_lookup": {"strategy": "prompt_lookup", "branch_length": LOOKUP_TOKENS}}
GOALS = {
    "compression": f"step compression >= 2.0 on code and retrieval with N={N}, W=G={W} (jacobi)",
    "cpu_auto": "auto >= 1.3x greedy tokens/s on CPU for retrieval and rewrite",
    "gpu_code": "(GPU) auto >= 1.8x greedy tokens/s on the default model for code",
    "gpu_overhead": "(GPU) fastdecode's own per-step overhead < 5% of step time at Llama-7B "
                    "shape (jacobi and auto each)",
    "cpu_trie": "trie auto >= 1.5x greedy tokens/s on CPU for retrieval and rewrite",
    "gpu_trie": "(GPU) trie auto >= 2.5x greedy tokens/s for retrieval and rewrite",
    "trie_vs_lookup": "trie auto faster than HF prompt lookup on every category",
    "floor": "under a competing CPU load (one busy process), jacobi auto and trie auto >= 0.98x "
             "greedy tokens/s on every category",
}
LOADED = ("greedy", "auto", "trie_auto")  # the strategies also run under a competing load


@contextlib.contextmanager
def competing_load():
    """One busy-looping process (any core the OS gives it, like another job on the machine)
    for the duration of the block, stopped after."""
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)  # let it get scheduled
        yield
    finally:
        busy.kill()
        busy.wait()


def sync(device: torch.device) -> None:
    """Waits for the GPU's queued work (nothing to wait for on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- the default model on the prompt set ----------------------------------------------------


_KEPT_TRIES: dict[tuple, object] = {}


class Linears:
    """Which kernels the model's ``nn.Linear`` layers run: fastdecode's CPU kernel (``on``) or
    torch's; :meth:`stock` runs a block on torch's either way."""

    def __init__(self, model, on: bool) -> None:
        from fastdecode.hf import use_cpu_linears

        self.model, self.patch = model, use_cpu_linears
        self.handle = use_cpu_linears(model) if on else None

    @contextlib.contextmanager
    def stock(self):
        if self.handle is None:
            yield
            return
        self.handle.restore()
        try:
            yield
        finally:
            self.handle = self.patch(self.model)


def run_strategy(model, ids: torch.Tensor, strategy: str, max_new_tokens: int,
                 linears: Linears) -> dict:
    """One decoding of ``ids`` ([1, L]) with ``strategy``: its output, wall seconds and, for
    fastdecode, its forwards, forward/overhead seconds and drafter counters. "trie_warm" keeps
    one TrieCache per prompt across rounds: the repeated-workload case (warm after round 1)."""
    device = ids.device
    settings = dict(SETTINGS.get(strategy, {}))
    if strategy == "trie_warm":
        from fastdecode.decoding import TrieCache

        key = tuple(ids[0].tolist())
        settings["trie_cache"] = _KEPT_TRIES.setdefault(key, TrieCache(model.config.vocab_size))
    with linears.stock() if strategy == "hf_stock" else contextlib.nullcontext():
        sync(device)
        t0 = time.perf_counter()
        if strategy.startswith("hf_"):
            extra = {"prompt_lookup_num_tokens": LOOKUP_TOKENS} if strategy == "hf_lookup" else {}
            sequences = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                       max_new_tokens=max_new_tokens,
                                       pad_token_id=model.generation_config.pad_token_id, **extra)
            stats = None
        else:
            out = fastdecode.generate(model, ids, max_new_tokens=max_new_tokens, **settings)
            sequences, stats = out.sequences, out.stats
        sync(device)
        seconds = time.perf_counter() - t0
    run = {"sequences": sequences.cpu(), "seconds": seconds,
           "new_tokens": sequences.shape[1] - ids.shape[1]}
    if stats is not None:
        run.update(steps=stats.steps, forward_s=stats.forward_s, overhead_s=stats.overhead_s,
                   drafter=stats.drafter)
    return run


def bench_prompts(model, tokenizer, device: torch.device, prompts: dict, budgets: dict,
                  rounds: int, floor_rounds: int, linears: Linears,
                  only: tuple[str, ...] = STRATEGIES) -> list[dict]:
    """Every prompt with every strategy of ``only`` (hf_stock only while fastdecode's linears
    are on), ``rounds`` interleaved rounds (``floor_rounds`` for the :data:`LOADED` strategies,
    which the floor goal compares), every other one in reverse order (so that a machine whose
    speed drifts within a round favours no strategy); one row per (prompt, strategy) with its
    fastest round and the check of every round's output against greedy's."""
    from fastdecode.models.prompts import chat_input_ids

    jobs = [(cat, i, chat_input_ids(tokenizer, p).to(device)) for cat, ps in prompts.items()
            for i, p in enumerate(ps)]
    lengths = {(cat, i): ids.shape[1] for cat, i, ids in jobs}
    best: dict[tuple, dict] = {}
    seconds: dict[tuple, list[float]] = {}
    present = [s for s in STRATEGIES
               if s in only and (s != "hf_stock" or linears.handle is not None)]
    total = max(rounds, floor_rounds)
    outputs: dict[tuple, list[torch.Tensor]] = {}
    for r in range(total):
        strategies = [s for s in present
                      if r < (floor_rounds if s in LOADED else rounds)]
        for cat, i, ids in jobs:
            for strategy in strategies if r % 2 == 0 else strategies[::-1]:
                run = run_strategy(model, ids, strategy, budgets[cat], linears)
                key = (cat, i, strategy)
                seconds.setdefault(key, []).append(run["seconds"])
                outputs.setdefault(key, []).append(run["sequences"])
                if key not in best or run["seconds"] < best[key]["seconds"]:
                    best[key] = run
            g = best[(cat, i, "greedy")]
            print(f"round {r + 1}/{total} {cat} {i + 1}: " + "  ".join(
                f"{s} {best[(cat, i, s)]['new_tokens'] / best[(cat, i, s)]['seconds']:.1f} tok/s"
                for s in strategies) + f"  ({g['new_tokens']} tokens)", flush=True)
    rows = []
    for (cat, i, strategy), run in best.items():
        greedy = best[(cat, i, "greedy")]["sequences"]
        row = {"category": cat, "prompt": i, "strategy": strategy,
               "prompt_tokens": lengths[(cat, i)],
               "new_tokens": run["new_tokens"], "seconds": run["seconds"],
               "seconds_all_rounds": seconds[(cat, i, strategy)],
               "tokens_per_s": run["new_tokens"] / run["seconds"],
               "identical": all(torch.equal(out, greedy)
                                for out in outputs[(cat, i, strategy)])}
        for key in ("steps", "forward_s", "overhead_s", "drafter"):
            if key in run:
                row[key] = run[key]
        rows.append(row)
    return rows


def present_strategies(rows: list[dict]) -> list[str]:
    """The strategies that have rows, in STRATEGIES order."""
    have = {r["strategy"] for r in rows}
    return [s for s in STRATEGIES if s in have]


def summarize(rows: list[dict]) -> list[dict]:
    """Per category (and "all") and strategy: tokens/s, step compression, speedup, identical."""
    cats = list(dict.fromkeys(r["category"] for r in rows))
    out = []
    for cat in cats + ["all"]:
        mine = [r for r in rows if cat in ("all", r["category"])]
        base = [r for r in mine if r["strategy"] == "greedy"]
        base_tps = sum(r["new_tokens"] for r in base) / sum(r["seconds"] for r in base)
        for strategy in present_strategies(rows):
            sel = [r for r in mine if r["strategy"] == strategy]
            tokens = sum(r["new_tokens"] for r in sel)
            secs = sum(r["seconds"] for r in sel)
            entry = {"category": cat, "strategy": strategy, "prompts": len(sel), "tokens": tokens,
                     "seconds": secs, "tokens_per_s": tokens / secs,
                     "speedup": tokens / secs / base_tps,
                     "identical": sum(r["identical"] for r in sel), "step_compression": None}
            if all("steps" in r for r in sel):
                entry["steps"] = sum(r["steps"] for r in sel)
                entry["step_compression"] = sum(r["steps"] for r in base) / entry["steps"]
                entry["overhead_share"] = (sum(r["overhead_s"] for r in sel)
                                           / sum(r["forward_s"] + r["overhead_s"] for r in sel))
            if strategy in ("auto", "trie_auto"):
                choices: dict[str, int] = {}
                for r in sel:
                    for k, n in r["drafter"]["auto"]["choices"].items():
                        choices[k] = choices.get(k, 0) + n
                entry["auto_choices"] = dict(sorted(choices.items(), key=lambda kv: -kv[1]))
            if strategy == "auto":
                entry["auto_window"] = any(r["drafter"]["auto"]["window"] for r in sel)
                entry["auto_bounds"] = {k: sel[0]["drafter"][k]
                                        for k in ("window", "ngram", "guesses")}
            out.append(entry)
    return out


# ---- Llama-7B shape, random weights (CUDA) --------------------------------------------------


def random_llama(device: torch.device, dtype: torch.dtype, **shape) -> torch.nn.Module:
    """A randomly initialised ``LlamaForCausalLM`` of the given shape, built on ``device``."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    with torch.device(device):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**shape), dtype=dtype,
                                                 attn_implementation="sdpa")
    return model.eval()


def step_cost_curve(model, device: torch.device, tokens: tuple[int, ...], prefix: int,
                    reps: int) -> list[dict]:
    """Milliseconds of one ``TreeRunner.forward`` of a T-token chain after a ``prefix``-token
    prefill, per T, timed by the runner itself as ``config="auto"`` times its steps
    (:mod:`fastdecode.decoding.step_costs`: CUDA events on CUDA, the host clock elsewhere; the median
    of the last ``min(reps, SAMPLES)`` of ``reps`` forwards after two warm-ups; the step's KV is
    cropped each time)."""
    from fastdecode.hf.model import TreeRunner
    from fastdecode.decoding.step_costs import StepCosts

    runner = TreeRunner(model)
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    ids = torch.randint(vocab, (1, prefix), generator=gen).to(device)
    timed = StepCosts()
    with torch.no_grad():
        runner.prefill(ids, torch.ones_like(ids))
        for T in tokens:
            feed = torch.randint(vocab, (1, T), generator=gen).to(device)
            parents = (torch.arange(T, device=device) - 1)[None].contiguous()
            runner.costs = StepCosts()  # the warm-ups' timings are dropped
            for rep in range(reps + 2):
                if rep == 2:
                    runner.collect_timings()  # the warm-ups' timings go to the dropped costs
                    runner.costs = timed
                runner.forward(feed, parents)
                runner.cache.crop(-T)
            runner.collect_timings()
    rows = [{"tokens": T, "median_ms": timed.median(prefix, T) * 1e3} for T in tokens]
    for r in rows:
        r["vs_one_token"] = r["median_ms"] / rows[0]["median_ms"]
    return rows


def curve_entry(name: str, model, device: torch.device, tokens: tuple[int, ...], prefix: int,
                repeats: int) -> dict:
    """:func:`step_cost_curve` of ``model`` with what was measured, printed as it is."""
    rows = step_cost_curve(model, device, tokens, prefix, repeats)
    print(f"{name}: " + "  ".join(f"T={r['tokens']} {r['median_ms']:.1f} ms" for r in rows),
          flush=True)
    return {"model": name, "prefix": prefix, "repeats": repeats,
            "clock": "CUDA events" if device.type == "cuda" else "host clock", "rows": rows}


def fastdecode_attention_curve(model, device: torch.device, tokens: tuple[int, ...],
                               repeats: int, notes: list[str]) -> list[dict]:
    """The Llama-7B-shape curve again with ``attn_implementation="fastdecode"`` (tree steps on
    fastdecode's tree attention instead of SDPA and a 4-D mask), then the model back on SDPA.
    A failure becomes a note, so the rest of the bench still runs."""
    import fastdecode.hf  # noqa: F401  (registers "fastdecode")

    model.set_attn_implementation("fastdecode")
    try:
        return [curve_entry("Llama-7B shape, random weights, bf16, fastdecode tree attention",
                            model, device, tokens, CURVE_PREFIX, repeats)]
    except Exception as e:  # reported in the results, not raised: the other rows matter too
        notes.append(f"the fastdecode-attention curve failed: {type(e).__name__}: {e}")
        print(notes[-1], flush=True)
        return []
    finally:
        model.set_attn_implementation("sdpa")


def step_overhead(model, device: torch.device, prompt: int, new_tokens: int) -> list[dict]:
    """Per fastdecode strategy, one decoding of ``new_tokens`` tokens (no EOS) after a random
    ``prompt``-token prompt, after one warm-up: the seconds in the model's forwards, the rest,
    and the rest's share."""
    ids = torch.randint(model.config.vocab_size, (1, prompt),
                        generator=torch.Generator().manual_seed(1)).to(device)
    rows = []
    for name, kwargs in SETTINGS.items():
        for _ in range(2):
            stats = fastdecode.generate(model, ids, max_new_tokens=new_tokens, eos_token_id=[],
                                        **kwargs).stats
        total = stats.forward_s + stats.overhead_s
        rows.append({"strategy": name, "steps": stats.steps, "new_tokens": stats.new_tokens,
                     "forward_s": stats.forward_s, "overhead_s": stats.overhead_s,
                     "overhead_share": stats.overhead_s / total,
                     "per_step_overhead_ms": stats.overhead_s / stats.steps * 1e3})
    return rows


# ---- goals, markdown, plots -----------------------------------------------------------------


def goals(summary: list[dict], device_type: str, overhead: list[dict] | None,
          loaded: list[dict]) -> list[dict]:
    """Each goal with the measured values and 'met', 'not met' or 'not assessed' (and why);
    ``loaded``: the summary of the run under a competing load (empty when not run)."""
    get = {(s["category"], s["strategy"]): s for s in summary}
    out = []

    def add(key: str, values: dict, ok: bool | None, note: str = "") -> None:
        status = {True: "met", False: "not met", None: "not assessed"}[ok]
        unit = "share" if key == "gpu_overhead" else "ratio"
        out.append({"goal": GOALS[key], "status": status, "values": values, "unit": unit,
                    "note": note})

    comp = {c: get[(c, "jacobi")]["step_compression"] for c in ("code", "retrieval")
            if (c, "jacobi") in get}
    add("compression", comp, all(v >= 2.0 for v in comp.values()) if len(comp) == 2 else None)
    cpu = {c: get[(c, "auto")]["speedup"] for c in ("retrieval", "rewrite")
           if (c, "auto") in get and device_type == "cpu"}
    add("cpu_auto", cpu, all(v >= 1.3 for v in cpu.values()) if len(cpu) == 2 else None,
        "" if device_type == "cpu" else "a CPU goal")
    code = ({"code": get[("code", "auto")]["speedup"]}
            if ("code", "auto") in get and device_type == "cuda" else {})
    add("gpu_code", code, code["code"] >= 1.8 if code else None,
        "" if device_type == "cuda" else "a GPU goal")
    for key, device, target in (("cpu_trie", "cpu", 1.5), ("gpu_trie", "cuda", 2.5)):
        trie = {c: get[(c, "trie_auto")]["speedup"] for c in ("retrieval", "rewrite")
                if (c, "trie_auto") in get and device_type == device}
        add(key, trie, all(v >= target for v in trie.values()) if len(trie) == 2 else None,
            "" if device_type == device else f"a {device.upper()} goal")
    cats = sorted({c for c, _ in get if c != "all"})
    versus = {c: get[(c, "trie_auto")]["tokens_per_s"] / get[(c, "hf_lookup")]["tokens_per_s"]
              for c in cats if (c, "trie_auto") in get and (c, "hf_lookup") in get}
    add("trie_vs_lookup", versus, all(v > 1 for v in versus.values()) if versus else None)
    share = {r["strategy"]: r["overhead_share"] for r in overhead or [] if r["strategy"] != "greedy"}
    add("gpu_overhead", share, all(v < 0.05 for v in share.values()) if share else None,
        "" if share else "needs CUDA: measured on the Llama-7B shape part")
    floor = {f"{s['category']} {LABELS[s['strategy']]}": s["speedup"] for s in loaded
             if s["strategy"] != "greedy" and s["category"] != "all"}
    add("floor", floor, all(v >= 0.98 for v in floor.values()) if floor else None,
        "" if floor else "the loaded run was not made (--no-load)")
    return out


def _x(v: float | None) -> str:
    """A ratio as '1.23x', or '-' for none."""
    return "-" if v is None else f"{v:.2f}x"


def markdown(report: dict) -> str:
    """The report as a markdown page."""
    threads = report["torch_threads"]
    budgets = ", ".join(f"{c} {n}" for c, n in report["max_new_tokens"].items())
    floor_rounds = report.get("floor_rounds", report["rounds"])
    full = bool(report["rows"])  # False for --floor-only: the loaded pass alone
    rounds = (f"{report['rounds']} interleaved round(s) ({floor_rounds} for fastdecode greedy, "
              "jacobi auto and trie auto; every other round in reverse order)" if full else
              f"{floor_rounds} interleaved round(s) (every other one in reverse order)")
    lines = [f"# fastdecode end-to-end decoding on {report['device']}", "",
             f"torch {report['torch']}, transformers {report['transformers']}, fastdecode "
             f"{report['fastdecode']}, {report['date']}; {threads} torch "
             f"thread{'s' if threads > 1 else ''}. Default model: SmolLM2-135M-Instruct, fp32, "
             f"batch 1, built-in prompt set; most new tokens per prompt: {budgets}. Each "
             f"prompt's fastest of {rounds}, wall clock around the "
             "whole call (the first `auto` call of the run also probes the model's forward "
             "costs, a few forwards). Speedup and step compression are against fastdecode "
             "greedy; identical counts the prompts whose output equals greedy's token for "
             "token in every round.", ""]
    if report.get("linears") == "fastdecode" and not full:
        lines += ["Every model forward runs the model's `nn.Linear` layers through "
                  "fastdecode's CPU kernel (`fastdecode.hf.use_cpu_linears`).", ""]
    elif report.get("linears") == "fastdecode":
        lines += ["Every row but \"HF greedy, torch linears\" runs the model's `nn.Linear` layers "
                  "through fastdecode's CPU kernel (`fastdecode.hf.use_cpu_linears`), "
                  "transformers' rows included, so that the ratios compare strategies on the "
                  "same kernels; that row is transformers' greedy on torch's own linears.", ""]
    if report.get("real_model_skipped"):
        lines += [f"Default model part skipped: {report['real_model_skipped']}", ""]
    if report["summary"]:
        lines += ["| category | strategy | tokens | tok/s | step compression | speedup | "
                  "identical | overhead share |",
                  "| --- | --- | ---: | ---: | ---: | ---: | --- | ---: |"]
        for s in report["summary"]:
            share = s.get("overhead_share")
            lines.append(
                f"| {s['category']} | {LABELS[s['strategy']]} | {s['tokens']} | "
                f"{s['tokens_per_s']:.1f} | {_x(s['step_compression'])} | {_x(s['speedup'])} | "
                f"{s['identical']}/{s['prompts']} | {'-' if share is None else f'{share:.1%}'} |")
        lines += ["", "Overhead share: the part of fastdecode's call time outside the model's "
                  "forwards (drafting, masks, verification, KV commits, bookkeeping).", "",
                  "What `auto` chose per step (g candidates of k tokens; g=0,k=0 is plain "
                  "decoding), within its default bounds (W={window}, N<={ngram}, "
                  "G<={guesses}):".format(**next(s["auto_bounds"] for s in report["summary"]
                                                   if s["strategy"] == "auto")), ""]
        for s in report["summary"]:
            if s["strategy"] == "auto":
                steps = sum(s["auto_choices"].values())
                shares = ", ".join(f"{k} {n / steps:.0%}" for k, n in s["auto_choices"].items())
                lines.append(f"- {s['category']}: window {'on' if s['auto_window'] else 'off'}; "
                             f"{shares}")
        lines += ["", "What `trie auto` chose per step (the draft tree's node budget; nodes=1 is "
                  "plain decoding), up to 64 nodes, depth 12:", ""]
        for s in report["summary"]:
            if s["strategy"] == "trie_auto":
                steps = sum(s["auto_choices"].values())
                shares = ", ".join(f"{k} {n / steps:.0%}" for k, n in s["auto_choices"].items())
                lines.append(f"- {s['category']}: {shares}")
        lines.append("")
    if report.get("loaded_summary"):
        lines += ["## Under a competing load", "",
                  "The same prompts with one busy-looping process running beside the benchmark "
                  "(started by it and stopped after), greedy and the two `auto` strategies only, "
                  f"each prompt's fastest of {floor_rounds} round(s):", "",
                  "| category | strategy | tok/s | step compression | speedup | identical |",
                  "| --- | --- | ---: | ---: | ---: | --- |"]
        lines += [f"| {s['category']} | {LABELS[s['strategy']]} | {s['tokens_per_s']:.1f} | "
                  f"{_x(s['step_compression'])} | {_x(s['speedup'])} | "
                  f"{s['identical']}/{s['prompts']} |" for s in report["loaded_summary"]]
        lines.append("")
    lines += ["## Goals", "", "| goal | measured | status |", "| --- | --- | --- |"]
    for g in report["goals"]:
        values = ", ".join(f"{k} {v:.1%}" if g["unit"] == "share" else f"{k} {v:.2f}x"
                           for k, v in g["values"].items()) or "-"
        note = f" ({g['note']})" if g["note"] else ""
        lines.append(f"| {g['goal']} | {values} | {g['status']}{note} |")
    lines.append("")
    for curve in report["curves"]:
        lines += [f"## Step cost against tokens fed: {curve['model']}", "",
                  f"`TreeRunner.forward` of a T-token chain after a {curve['prefix']}-token "
                  f"prefill (sdpa attention), median of {curve['repeats']} ({curve['clock']}).",
                  "", "| T | median ms | vs T=1 |", "| ---: | ---: | ---: |"]
        lines += [f"| {r['tokens']} | {r['median_ms']:.2f} | {r['vs_one_token']:.2f}x |"
                  for r in curve["rows"]]
        lines.append("")
    if report.get("overhead"):
        lines += ["## Overhead at Llama-7B shape (random weights, bf16)", "",
                  f"Share of a {OVERHEAD_TOKENS}-token decoding (after a {OVERHEAD_PROMPT}-token "
                  "random prompt, no EOS; the second of two calls) spent outside the model's "
                  "forwards:", "",
                  "| strategy | steps | forward s | overhead s | overhead share | overhead ms/step |",
                  "| --- | ---: | ---: | ---: | ---: | ---: |"]
        lines += [f"| {r['strategy']} | {r['steps']} | {r['forward_s']:.3f} | "
                  f"{r['overhead_s']:.3f} | {r['overhead_share']:.1%} | "
                  f"{r['per_step_overhead_ms']:.2f} |" for r in report["overhead"]]
        lines.append("")
    if report.get("llama7b_skipped"):
        lines += [f"Llama-7B shape part: {report['llama7b_skipped']}", ""]
    for note in report["notes"]:
        lines.append(f"Note: {note}")
    return "\n".join(lines).rstrip() + "\n"


def plot(report: dict, out: Path) -> list[Path]:
    """decode_e2e.png (tokens/s and step compression per category and strategy) and
    decode_e2e_curve.png (a panel per step-cost curve); raises ImportError without
    matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    if report["summary"]:
        cats = list(dict.fromkeys(s["category"] for s in report["summary"]))
        get = {(s["category"], s["strategy"]): s for s in report["summary"]}
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
        strategies = present_strategies(report["summary"])
        width = 0.8 / len(strategies)
        for k, strategy in enumerate(strategies):
            xs = [i + (k - (len(strategies) - 1) / 2) * width for i in range(len(cats))]
            axes[0].bar(xs, [get[(c, strategy)]["tokens_per_s"] for c in cats], width,
                        label=LABELS[strategy], color=f"C{k}")
            comp = [get[(c, strategy)]["step_compression"] for c in cats]
            if comp[0] is not None:
                axes[1].bar(xs, comp, width, label=LABELS[strategy], color=f"C{k}")
        for ax, title in zip(axes, ("tokens/s", "step compression (greedy steps / steps)")):
            ax.set_xticks(range(len(cats)), cats)
            ax.set_title(title)
            ax.grid(axis="y", alpha=0.3)
        axes[1].axhline(1.0, color="grey", lw=0.8)
        columns = 4
        fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=columns,
                   fontsize=8)
        threads = report["torch_threads"]
        fig.suptitle(f"SmolLM2-135M-Instruct on {report['device']} ({threads} torch "
                     f"thread{'s' if threads > 1 else ''}); transformers' rows have no step "
                     "counts", fontsize=10)
        fig.tight_layout(rect=(0, 0.05 * -(-len(strategies) // columns), 1, 1))
        paths.append(out / "decode_e2e.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    if report["curves"]:
        fig, axes = plt.subplots(1, len(report["curves"]), figsize=(6 * len(report["curves"]), 4),
                                 squeeze=False)
        for ax, curve in zip(axes[0], report["curves"]):
            ax.plot([r["tokens"] for r in curve["rows"]], [r["median_ms"] for r in curve["rows"]],
                    marker="o")
            ax.set_xlabel("tokens fed in one step (chain)")
            ax.set_ylabel("ms per forward")
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
            ax.set_title(f"{curve['model']}\n{report['device']}, {curve['prefix']}-token prefix",
                         fontsize=9)
        fig.tight_layout()
        paths.append(out / "decode_e2e_curve.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


# ---- main -----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = _report.parser(__doc__, "one prompt per category, 16 new tokens, one round, shorter "
                            "step-cost curves with fewer repeats")
    parser.add_argument("--rounds", type=int, default=2,
                        help="interleaved rounds per prompt and strategy, every other one in "
                        "reverse order; the fastest counts (default 2; --quick: 1)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: robust timings on a shared machine)")
    parser.add_argument("--no-load", action="store_true",
                        help="skip the second pass of greedy and the auto strategies under a "
                        "competing CPU load (one busy process)")
    parser.add_argument("--linears", choices=("fastdecode", "torch"), default="fastdecode",
                        help="the kernels of the model's nn.Linear layers on the CPU: "
                        "fastdecode's (use_cpu_linears; default) or torch's")
    parser.add_argument("--floor-only", action="store_true",
                        help="only the run under a competing load (greedy and the auto "
                        "strategies, --floor-rounds rounds), written as decode_floor.json/.md "
                        "beside the full results")
    parser.add_argument("--floor-rounds", type=int, default=4,
                        help="rounds of greedy and the two auto strategies, the ones the floor "
                        "goal compares (default 4; --quick: 1)")
    args = _report.parse(parser, argv)
    if min(args.rounds, args.floor_rounds, args.threads) < 1:
        parser.error("--rounds, --floor-rounds and --threads must be at least 1")
    if args.floor_only and args.no_load:
        parser.error("--floor-only runs only the loaded pass: it cannot take --no-load")
    return args


def main(argv: list[str] | None = None) -> None:
    import transformers
    from transformers.utils import logging as hf_logging

    from fastdecode.models import load_default
    from fastdecode.models.prompts import MAX_NEW_TOKENS, PROMPTS

    args = parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    rounds = 1 if args.quick else args.rounds
    floor_rounds = 1 if args.quick else args.floor_rounds
    prompts = {c: ps[:1] for c, ps in PROMPTS.items()} if args.quick else PROMPTS
    budgets = {c: 16 for c in PROMPTS} if args.quick else dict(MAX_NEW_TOKENS)
    report = {
        "device": device_name(device), "device_type": device.type, "torch": torch.__version__,
        "transformers": transformers.__version__, "fastdecode": fastdecode.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch_threads": torch.get_num_threads(), "quick": args.quick, "rounds": rounds,
        "floor_rounds": floor_rounds,
        "linears": args.linears if device.type == "cpu" else "torch",
        "settings": {"window": W, "ngram": N, "guesses": G,
                     "prompt_lookup_num_tokens": LOOKUP_TOKENS},
        "max_new_tokens": budgets, "prompts": {c: len(ps) for c, ps in prompts.items()},
        "rows": [], "summary": [], "loaded_rows": [], "loaded_summary": [], "curves": [],
        "notes": [],
    }
    repeats = 5 if args.quick else 20
    try:
        model, tokenizer = load_default(device=device)
    except Exception as e:  # on the GPU machine the model exists only if its cache was carried
        report["real_model_skipped"] = f"load_default failed: {type(e).__name__}: {e}"
        print(f"skipping the default model: {report['real_model_skipped']}", flush=True)
    else:
        linears = Linears(model, args.linears == "fastdecode" and device.type == "cpu")
        if not args.floor_only:
            report["rows"] = bench_prompts(model, tokenizer, device, prompts, budgets, rounds,
                                           floor_rounds, linears)
            report["summary"] = summarize(report["rows"])
        if not args.no_load:
            print("under a competing load:", flush=True)
            with competing_load():
                report["loaded_rows"] = bench_prompts(model, tokenizer, device, prompts, budgets,
                                                      rounds, floor_rounds, linears,
                                                      LOADED)
            report["loaded_summary"] = summarize(report["loaded_rows"])
        if args.floor_only:
            report["goals"] = [g for g in goals([], device.type, None, report["loaded_summary"])
                               if g["goal"] == GOALS["floor"]]
            for g in report["goals"]:
                print(f"goal: {g['goal']}: {g['status']} {g['values']}")
            folder, also = _report.folders(args.out, RESULTS / device_slug(device))
            _report.save("decode_floor", report, markdown(report), folder, also)
            return
        tokens = DEFAULT_CURVE_TOKENS[:6] if args.quick else DEFAULT_CURVE_TOKENS
        if linears.handle is not None:
            report["curves"].append(curve_entry(
                "SmolLM2-135M-Instruct, fp32, fastdecode CPU linears", model, device, tokens,
                DEFAULT_CURVE_PREFIX, repeats))
        with linears.stock():
            report["curves"].append(curve_entry(
                "SmolLM2-135M-Instruct, fp32", model, device, tokens, DEFAULT_CURVE_PREFIX,
                repeats))
        del model
    overhead = None
    if device.type == "cuda":
        torch.cuda.empty_cache()
        llama = random_llama(device, torch.bfloat16, **LLAMA_7B)
        tokens = tuple(t for t in CURVE_TOKENS if t <= 64) if args.quick else CURVE_TOKENS
        report["curves"].append(curve_entry("Llama-7B shape, random weights, bf16", llama,
                                            device, tokens, CURVE_PREFIX, repeats))
        report["curves"] += fastdecode_attention_curve(llama, device, tokens, repeats,
                                                       report["notes"])
        overhead = report["overhead"] = step_overhead(llama, device, OVERHEAD_PROMPT,
                                                      OVERHEAD_TOKENS)
    else:
        report["llama7b_skipped"] = "needs CUDA (not run on this device)."
    report["goals"] = goals(report["summary"], device.type, overhead, report["loaded_summary"])
    for s in report["summary"]:
        print(f"{s['category']:10s} {s['strategy']:10s} {s['tokens_per_s']:7.1f} tok/s  "
              f"compression {_x(s['step_compression']):>6}  speedup {_x(s['speedup'])}  "
              f"identical {s['identical']}/{s['prompts']}")
    for g in report["goals"]:
        print(f"goal: {g['goal']}: {g['status']}")
    folder, also = _report.folders(args.out, RESULTS / device_slug(device))
    try:
        pngs = plot(report, folder)
    except ImportError:
        pngs = []
        report["notes"].append("matplotlib is not installed: no plots were drawn.")
    _report.save("decode_e2e", report, markdown(report), folder, also, pngs)


if __name__ == "__main__":
    main()
