"""What every benchmark script shares: its command line (``--device``, ``--out``, ``--quick``),
the names of the device it ran on, and writing its results: ``<name>.json`` and ``<name>.md``
(plus any charts) into the results folder, copied into ``$OUT`` when that is set and ``--out``
is not given."""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
from pathlib import Path
from typing import Sequence

import torch

RESULTS = Path(__file__).resolve().parent / "results"
"""Where every benchmark writes its results by default, one folder per device slug."""


def slug(text: str) -> str:
    """Lowercase, runs of anything but letters and digits turned into single dashes."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo, else platform's processor name."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


def device_slug(device: torch.device) -> str:
    """Results folder name: the GPU name, or ``cpu-`` and the CPU model without marks, clock
    and filler words (e.g. ``cpu-intel-xeon-platinum-8480``)."""
    if device.type == "cuda":
        return slug(device_name(device))
    model = re.sub(r"\(R\)|\(TM\)|\bCPU\b|\bProcessor\b|@.*|\d+-Core", " ", cpu_name(),
                   flags=re.IGNORECASE)
    return "cpu-" + (slug(model) or "unknown")


def fmt_us(us: float) -> str:
    """Microseconds for a table: one decimal below 1000, else whole with thousands separators."""
    return f"{us:.1f}" if us < 1000 else f"{us:,.0f}"


def parser(doc: str, quick_help: str, device_help: str | None = None) -> argparse.ArgumentParser:
    """An argument parser with the options every benchmark takes."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"),
                   default="cuda" if torch.cuda.is_available() else "cpu", help=device_help)
    p.add_argument("--out", type=Path, help="results folder (default bench/results/<device slug>/)")
    p.add_argument("--quick", action="store_true", help=quick_help)
    return p


def parse(p: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parses ``argv``; ``--device cuda`` without a GPU is a usage error."""
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    return args


def folders(out: Path | None, default: Path) -> tuple[Path, Path | None]:
    """The results folder (``out``, else ``default``; created) and the folder to copy the
    results into (``$OUT`` when set and ``out`` is not given, else None)."""
    folder = out or default
    folder.mkdir(parents=True, exist_ok=True)
    env_out = os.environ.get("OUT")
    return folder, Path(env_out) if env_out and out is None else None


def save(name: str, report: dict, markdown: str, folder: Path, also: Path | None,
         extra: Sequence[Path] = ()) -> None:
    """Writes ``<name>.json`` and ``<name>.md`` into ``folder``, copies them and the ``extra``
    files (charts already in ``folder``) into ``also``, and prints every path written."""
    paths = [folder / f"{name}.json", folder / f"{name}.md", *extra]
    paths[0].write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    paths[1].write_text(markdown)
    if also is not None:
        also.mkdir(parents=True, exist_ok=True)
        paths += [Path(shutil.copy(p, also)) for p in list(paths)]
    for path in paths:
        print(f"wrote {path}")
