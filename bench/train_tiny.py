"""Does CASTLE train? Tiny LLaMA-style byte-level language models, one per attention kind, trained
with the same seed, batches, token count and schedule on the Python standard library's own
source, split by file into train and validation (the paper's Table 1 comparison at a tiny
scale).

Attention kinds (``--attn``, all by default):
  ``standard``    causal softmax attention (SDPA) with ``heads_std`` heads,
  ``castle``      ``fastdecode.nn.CastleAttention`` with about 4/7 of the heads (parameter
                  parity: CASTLE has 7 head-sized projections against 4),
  ``castle-swl``  the same with a sliding lookahead window.
Blocks: RMSNorm pre-norm, attention with RoPE, RMSNorm, a feed-forward block from the ``FFNS``
registry (``--ffn``, default ``dense``: SwiGLU), residuals; tied input and output embeddings.
A structured FFN plugs in by adding a factory ``(d_model, d_ff) -> nn.Module`` to ``FFNS``;
``lowrank``, ``blockshuffle`` and ``lowrank-sgt`` are fastdecode's structured SwiGLU FFNs
(``fastdecode.nn.StructuredFFN``, gate and up as one structured layer) at about 31% of the
dense FFN's parameters, the last with self-guided training (the paper's stochastic variant,
guided over the first half of the steps; ``lowrank-sgt-det`` is the deterministic mix).
Several ``--ffn`` names train one model per (attention, FFN) pair, e.g. ``--attn standard
--ffn dense lowrank blockshuffle lowrank-sgt lowrank-sgt-det`` (the structured-FFN
comparison; its results go to structured_ffn_train.* instead).

The schedule: AdamW (betas 0.9/0.95, weight decay 0.1), linear warmup then cosine decay to 10%,
gradient clipping at 1. ``--minutes`` is the wall budget of the whole run: a short timing of
every model sets one step count that all of them share (``--steps`` fixes it instead).

Defaults: on CUDA a ~2.5 minute run (d_model 256, 4 layers, sequences of 512 bytes), sized for
``make gpu-check``; ``make train-tiny`` runs a longer one. On CPU a ~10 minute run (d_model 128,
4 layers, 128-byte sequences).

Usage: python bench/train_tiny.py [--device cpu|cuda] [--out DIR] [--quick] [--minutes M]
       [--steps N] [--attn KIND ...] [--ffn NAME]
Writes train_tiny.json, train_tiny.md and train_tiny.png (validation loss against tokens) into
DIR (default bench/results/<device slug>/), copied into $OUT when that is set and --out is not
given.
"""

from __future__ import annotations

import datetime
import math
import sysconfig
import time
import zlib
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

import fastdecode
from fastdecode import _backend
from fastdecode.nn.castle import CastleAttention, rotate
from fastdecode.nn.ffn import StructuredFFN
from fastdecode.nn.self_guided import guided_layers, self_guide, step_self_guided

import _report
from _report import RESULTS, device_name, device_slug

NAME = "train_tiny"
ATTENTION_KINDS = ("standard", "castle", "castle-swl")
VOCAB = 256  # bytes


@dataclass(frozen=True)
class Config:
    """Model, data and schedule of one run (shared by every attention kind)."""

    d_model: int
    layers: int
    head_dim: int
    heads_std: int
    heads_castle: int
    window: int
    d_ff: int
    seq_len: int
    batch: int
    lr: float
    warmup_frac: float = 0.05
    eval_every: int = 25
    eval_batches: int = 8
    seed: int = 0


def default_config(device: torch.device, quick: bool) -> Config:
    """7 standard heads against 4 CASTLE heads of the same width: equal attention parameters
    (4 x 7 = 7 x 4 head-sized projections)."""
    if device.type == "cuda":
        cfg = Config(d_model=256, layers=4, head_dim=32, heads_std=7, heads_castle=4, window=64,
                     d_ff=688, seq_len=512, batch=32, lr=2e-3)
    else:
        cfg = Config(d_model=128, layers=4, head_dim=16, heads_std=7, heads_castle=4, window=32,
                     d_ff=344, seq_len=128, batch=16, lr=3e-3)
    return replace(cfg, eval_every=5, eval_batches=2) if quick else cfg


# ---- the corpus -------------------------------------------------------------------------------


def stdlib_files() -> list[Path]:
    """The standard library's .py files (site-packages excluded), sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(f for f in root.rglob("*.py") if "site-packages" not in f.relative_to(root).parts)


def corpus() -> tuple[torch.Tensor, torch.Tensor, dict]:
    """uint8 train and validation streams: each file is in validation when the CRC32 of its
    path inside the standard library is 0 mod 10, files joined by a NUL byte."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts: dict[str, list[bytes]] = {"train": [], "val": []}
    for f in stdlib_files():
        split = "val" if zlib.crc32(str(f.relative_to(root)).encode()) % 10 == 0 else "train"
        parts[split].append(f.read_bytes())
    if len(parts["train"]) < 100 or not parts["val"]:
        raise SystemExit(f"the standard library under {root} has too few .py files "
                         f"({len(parts['train'])} train, {len(parts['val'])} validation): this "
                         "Python ships compiled modules only")
    streams = {k: torch.frombuffer(bytearray(b"\0".join(v)), dtype=torch.uint8)
               for k, v in parts.items()}
    info = {"root": str(root), "train_files": len(parts["train"]), "val_files": len(parts["val"]),
            "train_bytes": streams["train"].numel(), "val_bytes": streams["val"].numel()}
    return streams["train"], streams["val"], info


def batches(stream: torch.Tensor, n: int, cfg: Config, seed: int) -> list[torch.Tensor]:
    """``n`` batches of ``[batch, seq_len + 1]`` random windows of ``stream`` (int64)."""
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, stream.numel() - cfg.seq_len - 1, (n, cfg.batch), generator=gen)
    idx = starts[..., None] + torch.arange(cfg.seq_len + 1)
    return list(stream[idx].long())


# ---- the model --------------------------------------------------------------------------------


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))``, no biases."""

    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.gate = nn.Linear(d_model, d_ff, bias=False)
        self.up = nn.Linear(d_model, d_ff, bias=False)
        self.down = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


FFNS: dict[str, Callable[[int, int], nn.Module]] = {"dense": SwiGLU}
"""Feed-forward factories ``(d_model, d_ff) -> module over [..., d_model]``, chosen by --ffn."""
FFN_SHARE = 0.3125
"""The structured FFNs' share of the dense SwiGLU's FFN parameters (the paper's "32%")."""


def structured_ffn(kind: str, guided: bool = False,
                   stochastic: bool = True) -> Callable[[int, int], nn.Module]:
    """A factory of fastdecode SwiGLU ``StructuredFFN``s at about FFN_SHARE of the dense FFN's
    parameters: LowRank with the nearest rank, or BlockShuffle with 4 blocks. ``guided`` wraps
    its layers for self-guided training (``stochastic``: the paper's cheap variant, whose
    expected mix is α² rather than α); ``train`` sets the guided phase."""

    def make(d_model: int, d_ff: int) -> nn.Module:
        if kind == "lowrank":
            rank = round(FFN_SHARE * 3 * d_model * d_ff / (2 * d_model + 3 * d_ff))
            ffn = StructuredFFN(d_model, d_ff, "lowrank", rank=rank)
        else:
            ffn = StructuredFFN(d_model, d_ff, "blockshuffle", blocks=4)
        if guided:
            self_guide(ffn, guide_steps=1 << 30, stochastic=stochastic)
        return ffn

    return make


FFNS.update(lowrank=structured_ffn("lowrank"), blockshuffle=structured_ffn("blockshuffle"))
FFNS["lowrank-sgt"] = structured_ffn("lowrank", guided=True)
FFNS["lowrank-sgt-det"] = structured_ffn("lowrank", guided=True, stochastic=False)


class StandardAttention(nn.Module):
    """Causal multi-head softmax attention with RoPE on q and k (SDPA)."""

    def __init__(self, d_model: int, n_heads: int, head_dim: int) -> None:
        super().__init__()
        self.n_heads, self.head_dim = n_heads, head_dim
        self.qkv = nn.Linear(d_model, 3 * n_heads * head_dim, bias=False)
        self.out = nn.Linear(n_heads * head_dim, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = rotate(q, 0, 10000.0), rotate(k, 0, 10000.0)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(o.transpose(1, 2).reshape(B, T, -1))


def attention(kind: str, cfg: Config) -> nn.Module:
    if kind == "standard":
        return StandardAttention(cfg.d_model, cfg.heads_std, cfg.head_dim)
    window = cfg.window if kind == "castle-swl" else None
    return CastleAttention(cfg.d_model, cfg.heads_castle, cfg.head_dim, window=window)


class Block(nn.Module):
    def __init__(self, kind: str, cfg: Config, ffn: str) -> None:
        super().__init__()
        self.norm1 = nn.RMSNorm(cfg.d_model)
        self.attn = attention(kind, cfg)
        self.norm2 = nn.RMSNorm(cfg.d_model)
        self.ffn = FFNS[ffn](cfg.d_model, cfg.d_ff)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.ffn(self.norm2(x))


class TinyLM(nn.Module):
    """Byte-level LLaMA-style LM: embedding, blocks, RMSNorm, tied output projection."""

    def __init__(self, kind: str, cfg: Config, ffn: str = "dense") -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, cfg.d_model)
        self.blocks = nn.ModuleList(Block(kind, cfg, ffn) for _ in range(cfg.layers))
        self.norm = nn.RMSNorm(cfg.d_model)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02 if "embed" in name else 1 / math.sqrt(p.shape[1]))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.norm(x) @ self.embed.weight.T

    def loss(self, batch: torch.Tensor) -> torch.Tensor:
        logits = self(batch[:, :-1])
        return F.cross_entropy(logits.float().reshape(-1, VOCAB), batch[:, 1:].reshape(-1))


def attention_params(model: TinyLM) -> int:
    return sum(p.numel() for b in model.blocks for p in b.attn.parameters())


def ffn_params(model: TinyLM) -> int:
    return sum(p.numel() for b in model.blocks for p in b.ffn.parameters())


# ---- training ---------------------------------------------------------------------------------


def lr_at(step: int, steps: int, cfg: Config) -> float:
    """Linear warmup, then cosine decay to 10% of the peak."""
    warm = max(1, int(cfg.warmup_frac * steps))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    progress = (step - warm) / max(1, steps - warm)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def make_model(kind: str, cfg: Config, ffn: str, device: torch.device) -> TinyLM:
    torch.manual_seed(cfg.seed)
    model = TinyLM(kind, cfg, ffn)
    for i, layer in enumerate(guided_layers(model)):  # self-guided: W starts as the structure
        layer.layer_id = i
        layer.reset_guide()
    return model.to(device)


def optimizer(model: TinyLM, cfg: Config) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                              {"params": rest, "weight_decay": 0.0}],
                             lr=cfg.lr, betas=(0.9, 0.95))


def autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


@torch.no_grad()
def evaluate(model: TinyLM, val: list[torch.Tensor], device: torch.device) -> float:
    model.eval()
    with autocast(device):
        losses = [model.loss(b.to(device)).item() for b in val]
    model.train()
    return sum(losses) / len(losses)


def seconds_per_step(kind: str, cfg: Config, ffn: str, device: torch.device,
                     batch: torch.Tensor, steps: int = 3) -> float:
    """Wall time of one training step of ``kind`` (after one warm-up step)."""
    model = make_model(kind, cfg, ffn, device)
    opt = optimizer(model, cfg)
    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        with autocast(device):
            loss = model.loss(batch.to(device))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sum(times[1:]) / steps


def train(kind: str, cfg: Config, ffn: str, device: torch.device, steps: int,
          train_stream: torch.Tensor, val: list[torch.Tensor]) -> dict:
    """Trains one model for ``steps`` steps; returns its curve and final numbers."""
    model = make_model(kind, cfg, ffn, device)
    for layer in guided_layers(model):
        layer.guide_steps = steps // 2
    opt = optimizer(model, cfg)
    curve = [{"step": 0, "tokens": 0, "val_loss": evaluate(model, val, device)}]
    train_losses = []
    t0 = time.perf_counter()
    for step in range(steps):
        (batch,) = batches(train_stream, 1, cfg, seed=cfg.seed * 1_000_003 + step + 1)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, cfg)
        with autocast(device):
            loss = model.loss(batch.to(device))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step_self_guided(model, opt)
        train_losses.append(loss.item())
        if (step + 1) % cfg.eval_every == 0 or step + 1 == steps:
            curve.append({"step": step + 1, "tokens": (step + 1) * cfg.batch * cfg.seq_len,
                          "val_loss": evaluate(model, val, device),
                          "train_loss": sum(train_losses[-cfg.eval_every:])
                          / len(train_losses[-cfg.eval_every:])})
            print(f"  {kind:<11} {ffn:<12} step {step + 1:>5}/{steps}  "
                  f"train {curve[-1]['train_loss']:.4f}"
                  f"  val {curve[-1]['val_loss']:.4f}  ({time.perf_counter() - t0:.0f} s)",
                  flush=True)
    return {"attn": kind, "ffn": ffn, "params": sum(p.numel() for p in model.parameters()),
            "attention_params": attention_params(model), "ffn_params": ffn_params(model),
            "steps": steps,
            "tokens": steps * cfg.batch * cfg.seq_len, "seconds": time.perf_counter() - t0,
            "final_val_loss": curve[-1]["val_loss"], "curve": curve}


# ---- output -----------------------------------------------------------------------------------


def markdown(report: dict) -> str:
    cfg, data = report["config"], report["data"]
    title = ("standard attention against CASTLE" if report["ffn"] == ["dense"]
             else "structured FFNs against dense")
    lines = [
        f"# Tiny LM training: {title} on {report['device']}",
        "",
        f"torch {report['torch']}, fastdecode {report['fastdecode']}, {report['date']}; "
        f"{report['note']}. CASTLE ran on the `{report['castle_backend']}` backend.",
        "",
        f"Data: the Python standard library's source ({data['train_files']} train files, "
        f"{data['train_bytes']:,} bytes; {data['val_files']} validation files, "
        f"{data['val_bytes']:,} bytes), byte-level. Model: d_model {cfg['d_model']}, "
        f"{cfg['layers']} layers, head dim {cfg['head_dim']}, {cfg['heads_std']} standard "
        f"heads against {cfg['heads_castle']} CASTLE heads, SWL window {cfg['window']}, FFN "
        f"`{', '.join(report['ffn'])}` (hidden {cfg['d_ff']}), sequences of {cfg['seq_len']} "
        f"bytes, batch "
        f"{cfg['batch']}, peak LR {cfg['lr']}. Every model: the same seed, batches, steps and "
        f"schedule; validation loss (nats per byte) over {cfg['eval_batches']} fixed batches.",
        "",
        "| attention | FFN | params | attention params | FFN params | steps | tokens | "
        "train time s | final val loss | vs standard | vs dense FFN |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    final = {(r["attn"], r["ffn"]): r["final_val_loss"] for r in report["runs"]}
    for r in report["runs"]:
        deltas = []
        for base in (final.get(("standard", r["ffn"])), final.get((r["attn"], "dense"))):
            same = base is None or base is r["final_val_loss"]
            deltas.append("-" if same else f"{r['final_val_loss'] - base:+.4f}")
        lines.append(f"| {r['attn']} | {r['ffn']} | {r['params']:,} | "
                     f"{r['attention_params']:,} | {r['ffn_params']:,} | {r['steps']} | "
                     f"{r['tokens']:,} | {r['seconds']:.0f} | {r['final_val_loss']:.4f} | "
                     f"{deltas[0]} | {deltas[1]} |")
    lines += ["", report["verdict"]]
    return "\n".join(lines) + "\n"


def verdict(runs: list[dict]) -> str:
    by = {(r["attn"], r["ffn"]): r["final_val_loss"] for r in runs}
    parts = []
    for (attn, ffn), loss in by.items():
        for other, base in ((("standard", ffn), "standard"), ((attn, "dense"), "the dense FFN")):
            if other in by and other != (attn, ffn):
                d = loss - by[other]
                word = "lower" if d < 0 else "higher"
                parts.append(f"{attn}/{ffn} ends {abs(d):.4f} nats/byte {word} than {base}")
    if not parts:
        return "Only one model ran: nothing to compare."
    return ("Result (one seed, tiny scale; differences of a few hundredths can be noise): "
            + "; ".join(parts) + ".")


def plot(report: dict, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in report["runs"]:
        pts = [(p["tokens"], p["val_loss"]) for p in r["curve"] if p["step"] > 0]
        ax.plot([t for t, _ in pts], [v for _, v in pts], marker=".",
                label=r["attn"] if len(report["ffn"]) == 1 else f"{r['attn']} / {r['ffn']}")
    ax.set_xlabel("training tokens (bytes)")
    ax.set_ylabel("validation loss (nats/byte)")
    ax.set_title(f"tiny byte-level LMs on the Python stdlib ({report['device']})", fontsize=10)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    p = _report.parser(__doc__, "a few steps of a smaller run (a smoke test)")
    p.add_argument("--minutes", type=float, help="wall budget of the whole run "
                   "(default: 10 on CPU, 2.5 on CUDA; 0.5 with --quick)")
    p.add_argument("--steps", type=int, help="training steps per model (overrides --minutes)")
    p.add_argument("--attn", nargs="+", choices=ATTENTION_KINDS, default=list(ATTENTION_KINDS))
    p.add_argument("--ffn", nargs="+", choices=sorted(FFNS), default=["dense"])
    args = _report.parse(p, argv)
    device = torch.device(args.device)
    cfg = default_config(device, args.quick)
    minutes = args.minutes or (0.5 if args.quick else 2.5 if device.type == "cuda" else 10.0)
    started = time.perf_counter()
    train_stream, val_stream, data = corpus()
    val = batches(val_stream, cfg.eval_batches, cfg, seed=12345)
    print(f"corpus: {data['train_files']} train files ({data['train_bytes']:,} bytes), "
          f"{data['val_files']} validation files ({data['val_bytes']:,} bytes)", flush=True)
    steps = args.steps
    if steps is None:
        probe = batches(train_stream, 1, cfg, seed=999)[0]
        per_step = {(k, f): seconds_per_step(k, cfg, f, device, probe)
                    for k in args.attn for f in args.ffn}
        evals_share = 1 + cfg.eval_batches / (3 * cfg.eval_every)  # evaluation's extra cost
        left = minutes * 60 - (time.perf_counter() - started)
        steps = max(cfg.eval_every, int(0.9 * left / (sum(per_step.values()) * evals_share)))
        print("seconds per step: " + ", ".join(f"{k}/{f} {v:.3f}"
                                               for (k, f), v in per_step.items())
              + f" -> {steps} steps each", flush=True)
    runs = [train(k, cfg, f, device, steps, train_stream, val)
            for k in args.attn for f in args.ffn]
    note = ("1 core (taskset -c 1), other jobs running on the machine"
            if device.type == "cpu" else "one GPU, bf16 autocast")
    report = {
        "device": device_name(device), "device_type": device.type, "torch": torch.__version__,
        "fastdecode": fastdecode.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "note": note, "castle_backend": _backend.select("castle_attention", device)[0],
        "ffn": args.ffn, "config": asdict(cfg), "data": data, "runs": runs,
        "verdict": verdict(runs), "wall_seconds": time.perf_counter() - started,
    }
    folder, also = _report.folders(args.out, RESULTS / device_slug(device))
    name = NAME if args.ffn == ["dense"] else "structured_ffn_train"
    png = plot(report, folder / f"{name}.png")
    _report.save(name, report, markdown(report), folder, also, [png] if png else [])


if __name__ == "__main__":
    main()
