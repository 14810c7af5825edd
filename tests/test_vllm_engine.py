"""fastdecode's TrieProposer inside vLLM's engine (runs where vLLM is importable: CI runs it in
``.venv-vllm``): greedy outputs equal vLLM's without speculation token for token, for a batch
of prompts submitted together and for multi-turn sessions whose later turns join a running
batch; with temperature > 0 every output is valid tokens within its budget."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")

from fastdecode.integrations import vllm_driver  # noqa: E402
from fastdecode.models import default_model_dir  # noqa: E402

MAX_TOKENS = 40


@pytest.fixture(scope="module")
def model_dir() -> str:
    folder = default_model_dir()
    if not (folder / "config.json").is_file():
        from fastdecode.models import load_default
        load_default()
    return str(folder)


def run(model_dir: str, tmp: Path, method: str, temperature: float = 0.0) -> dict:
    return vllm_driver.run_method(sys.executable, method, model_dir, tmp / f"{method}.json",
                                  "builtin,agentic", "16", temperature, MAX_TOKENS)


def test_greedy_outputs_equal_no_speculation(model_dir, tmp_path):
    plain = run(model_dir, tmp_path, "none")
    drafted = run(model_dir, tmp_path, "fastdecode")
    for base, ours in zip(plain["runs"], drafted["runs"]):
        assert base["workload"] == ours["workload"]
        summary = vllm_driver.summarize(ours, base)
        assert summary["identical"] == summary["sessions"], ours["workload"]
        assert summary["tokens"] > 0.8 * summary["sessions"] * MAX_TOKENS


def test_sampling_gives_valid_tokens(model_dir, tmp_path):
    import json

    vocab = json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"]
    result = run(model_dir, tmp_path, "fastdecode", temperature=0.8)
    for run_ in result["runs"]:
        for session in run_["sessions"]:
            for tokens in session["tokens"]:
                assert 0 < len(tokens) <= MAX_TOKENS
                assert all(0 <= t < vocab for t in tokens)
