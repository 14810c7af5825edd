"""``make vllm-demo``: the default model through vLLM on the built-in prompts, one request at a
time, with no speculation, vLLM's ``ngram`` (4 drafts) and ``suffix`` drafters, and
fastdecode's :class:`~fastdecode.integrations.vllm.TrieProposer`; per category the tokens/s,
the mean tokens per decode step, the speedup over no speculation and whether every output is
identical to it.

Run as ``python -m fastdecode.integrations.vllm_demo`` in an environment with vLLM (``make
vllm-demo`` builds one, ``.venv-vllm``), after the default model's folder has been built
(``fastdecode.models.load_default()`` in any environment with the conversion packages).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from fastdecode.integrations import vllm_driver

DEMO_METHODS = ("none", "ngram4", "suffix", "fastdecode")


def table(results: dict[str, dict]) -> str:
    """The per-category table of :func:`vllm_driver.by_category` for each method's single
    builtin run at concurrency 1, against ``results["none"]``."""
    base = results["none"]["runs"][0]
    base_cats = vllm_driver.by_category(base)
    base_tokens = {s["name"]: s["tokens"] for s in base["sessions"]}
    lines = [f"{'method':<11} {'category':<10} {'tok/s':>7} {'tok/step':>9} {'speedup':>8} "
             f"{'identical':>9}"]
    for method, result in results.items():
        run = result["runs"][0]
        for cat, row in vllm_driver.by_category(run).items():
            names = [s for s in run["sessions"] if s["category"] == cat]
            same = all(s["tokens"] == base_tokens[s["name"]] for s in names)
            speedup = row["tokens_per_s"] / base_cats[cat]["tokens_per_s"]
            lines.append(f"{method:<11} {cat:<10} {row['tokens_per_s']:7.1f} "
                         f"{row['tokens_per_step']:9.2f} {speedup:7.2f}x "
                         f"{'yes' if same else 'no':>9}")
        total = vllm_driver.summarize(run, base)
        lines.append(f"{method:<11} {'all':<10} {total['tokens_per_s']:7.1f} "
                     f"{total['tokens_per_step']:9.2f} {total['speedup']:7.2f}x "
                     f"{'yes' if total['identical'] == total['sessions'] else 'no':>9}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    from fastdecode.models import default_model_dir

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=",".join(DEMO_METHODS),
                        help="comma-separated, from " + ", ".join(vllm_driver.METHODS))
    parser.add_argument("--model", type=Path, default=default_model_dir(),
                        help="the model folder (default: the default model's)")
    args = parser.parse_args(argv)
    try:
        methods = vllm_driver.methods_to_run(args.methods)
    except ValueError as e:
        parser.error(f"--{e}")
    if not (args.model / "config.json").is_file():
        sys.exit(f"no model folder at {args.model}: build it with "
                 "`python -c 'from fastdecode.models import load_default; load_default()'`")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for method in methods:
            results[method] = vllm_driver.run_method(
                sys.executable, method, str(args.model), Path(tmp) / f"{method}.json",
                "builtin", "1")
    print(table(results))


if __name__ == "__main__":
    main()
