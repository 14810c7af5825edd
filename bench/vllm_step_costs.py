"""What one vLLM engine step costs against the draft tokens it verifies, at 1, 4 and 12 rows.

A drafter that always hands every decoding row the same number of draft tokens (one repeated
token, which the model almost never accepts) is loaded through vLLM's ``custom_class`` hook,
and the time from the end of one of its calls to the start of the next (one engine step:
schedule, forward, verify, sample) is recorded, as fastdecode's ``TrieProposer`` times the
engine. Each cell runs the first ``rows`` built-in prompts for ``--steps`` tokens each and
reports the median step; ``--repeats`` passes, every other one in reverse order of drafts,
and each cell takes the median of its passes' medians. This is the cost side that the
proposer learns online; on a CPU the curve is not a line (the matrix kernels change with the
tokens fed), which is why the proposer keeps step times per (rows, drafts) cell.

Run in the vLLM environment: ``.venv-vllm/bin/python bench/vllm_step_costs.py``. Results:
``bench/results/<device>/vllm_step_costs.{json,md,png}``.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

import torch

import _report
from _report import RESULTS, device_name, device_slug

from fastdecode.integrations import vllm_driver

ROWS = (1, 4, 12)
MAX_DRAFTS = 8
DRAFT_TOKEN = 13  # a token the model almost never predicts


class FixedDrafter:
    """vLLM's drafter that hands every decoding row ``drafts`` copies of ``DRAFT_TOKEN`` and
    records each engine step as ``(rows, seconds)``."""

    drafts = 0

    def __init__(self, vllm_config: object) -> None:
        self.steps: list[tuple[int, float]] = []
        self._open: tuple[int, float] | None = None

    def load_model(self, *args: object, **kwargs: object) -> None:
        """No draft model."""

    def propose(self, sampled_token_ids, num_tokens_no_spec, token_ids_cpu,
                slot_mappings=None) -> list[list[int]]:
        now = time.perf_counter()
        if self._open is not None:
            self.steps.append((self._open[0], now - self._open[1]))
        live = [s is not None and len(s) > 0 for s in sampled_token_ids]
        out = [[DRAFT_TOKEN] * self.drafts if on else [] for on in live]
        self._open = (sum(live), time.perf_counter())
        return out

    def stats(self) -> dict:
        return {"steps": self.steps}


def renew(worker: object, drafts: int) -> dict:
    """On vLLM's worker: a new drafter of ``drafts`` per row; the old one's steps."""
    FixedDrafter.drafts = drafts
    runner = worker.model_runner  # type: ignore[attr-defined]
    old = runner.drafter
    runner.drafter = FixedDrafter(runner.vllm_config)
    return old.stats()


def measure(llm: object, prompts: list[list[int]], rows: int, drafts: int, steps: int) -> float:
    """The median seconds of the engine's steps with ``rows`` rows decoding and ``drafts``
    drafts each."""
    from vllm import SamplingParams

    llm.collective_rpc(renew, args=(drafts,))  # type: ignore[attr-defined]
    params = SamplingParams(temperature=0.0, max_tokens=steps, ignore_eos=True)
    llm.generate([{"prompt_token_ids": p} for p in prompts[:rows]], params,  # type: ignore
                 use_tqdm=False)
    seen = llm.collective_rpc(renew, args=(drafts,))[0]["steps"]  # type: ignore[attr-defined]
    times = [s for r, s in seen if r == rows]
    return statistics.median(times)


def markdown(report: dict) -> str:
    lines = [f"# vLLM engine step time against draft tokens ({report['device']})", "",
             f"vLLM {report['vllm']}, torch {report['torch']}; {report['model']}, fp32, eager; "
             f"{report['date']}. Each row of the batch verifies the same number of drafts (one "
             "repeated token, almost never accepted); a step is the time from the end of one "
             "drafter call to the start of the next, median over "
             f"{report['steps']} steps a run, then over {report['repeats']} passes. "
             "Milliseconds, and in brackets against the same rows with no drafts.", "",
             "| rows | " + " | ".join(f"{d} drafts" for d in report["drafts"]) + " |",
             "|---|" + "---|" * len(report["drafts"])]
    for rows in report["rows"]:
        cells = report["ms"][str(rows)]
        lines.append(f"| {rows} | " + " | ".join(
            f"{ms:.1f} ({ms / cells[0]:.2f})" for ms in cells) + " |")
    return "\n".join(lines) + "\n"


def chart(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for rows in report["rows"]:
        ms = report["ms"][str(rows)]
        ax.plot([rows * (1 + d) for d in report["drafts"]], ms, marker="o", label=f"{rows} rows")
    ax.set_xlabel("tokens fed per step (rows x (1 + drafts))")
    ax.set_ylabel("step time (ms)")
    ax.set_title(f"vLLM step time, {report['device']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    from fastdecode.models import default_model_dir

    parser = _report.parser(__doc__, "one row and 0, 4 and 8 drafts, one pass")
    parser.add_argument("--model", type=Path, default=default_model_dir())
    parser.add_argument("--steps", type=int, default=40, help="tokens per request per run")
    parser.add_argument("--repeats", type=int, default=2)
    args = _report.parse(parser, argv)
    if args.steps < 8 or args.repeats < 1:
        parser.error(f"--steps must be >= 8 and --repeats >= 1, found {args.steps} and "
                     f"{args.repeats}")
    if vllm_driver.vllm_version() is None:
        parser.error("vLLM is not installed here: run it in .venv-vllm")
    # vLLM's engine process imports the drafter by module path: this folder must be on its path
    here = str(Path(__file__).resolve().parent)
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [here] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    vllm_driver.METHODS["fixed"] = {"method": "custom_class",
                                    "model": "vllm_step_costs.FixedDrafter",
                                    "num_speculative_tokens": MAX_DRAFTS}
    llm = vllm_driver.make_engine("fixed", str(args.model), max_num_seqs=max(ROWS))
    tokenizer = llm.get_tokenizer()
    prompts = [vllm_driver.prompt_ids(tokenizer, session.turns[0])
               for session in vllm_driver.sessions_of("builtin")]
    rows_set = (1,) if args.quick else ROWS
    drafts_set = (0, 4, 8) if args.quick else tuple(range(MAX_DRAFTS + 1))
    repeats = 1 if args.quick else args.repeats
    seconds: dict[tuple[int, int], list[float]] = {}
    for p in range(repeats):
        for rows in rows_set:
            for d in drafts_set if p % 2 == 0 else drafts_set[::-1]:
                seconds.setdefault((rows, d), []).append(
                    measure(llm, prompts, rows, d, args.steps))
                print(f"pass {p} rows {rows} drafts {d}: "
                      f"{1000 * seconds[(rows, d)][-1]:.1f} ms", file=sys.stderr, flush=True)
    device = torch.device(args.device)
    report = {"device": device_name(device),
              "vllm": vllm_driver.vllm_version(),
              "torch": torch.__version__, "model": args.model.name,
              "date": time.strftime("%Y-%m-%d %H:%M"), "steps": args.steps, "repeats": repeats,
              "rows": list(rows_set), "drafts": list(drafts_set),
              "ms": {str(r): [1000 * statistics.median(seconds[(r, d)]) for d in drafts_set]
                     for r in rows_set},
              "ms_all_passes": {f"{r}/{d}": [1000 * s for s in v]
                                for (r, d), v in seconds.items()}}
    folder, also = _report.folders(args.out, RESULTS / device_slug(device))
    png = folder / "vllm_step_costs.png"
    chart(report, png)
    _report.save("vllm_step_costs", report, markdown(report), folder, also, [png])
    print(markdown(report))


if __name__ == "__main__":
    main()
