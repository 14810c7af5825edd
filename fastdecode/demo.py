"""``make demo`` / ``fastdecode demo``: one verification step of tree decoding, worked by hand.

No model runs here yet: the "model's" predictions are written out, so that every number the
primitives print can be checked by eye. The decoding strategies will replace this with a real
model.
"""

from __future__ import annotations

import torch

from fastdecode import _backend
from fastdecode.ops import compact_kv, pack_tree_mask, tree_mask, tree_positions, verify_tree

WORDS = ["<pad>", "the", "cat", "sat", "on", "mat", "in", "a", "hat", "ran", "away", "box"]
ID = {w: i for i, w in enumerate(WORDS)}

# A draft tree rooted at the last accepted token "cat" (node 0), three branches:
#   cat -> sat -> on -> the      (nodes 1, 2, 3)
#          sat -> in             (node 4)
#   cat -> ran -> away           (nodes 5, 6)
# Row 1 holds the same shape of tree with other words and one padding node.
TREES = [
    (["cat", "sat", "on", "the", "in", "ran", "away"], [-1, 0, 1, 2, 1, 0, 5]),
    (["cat", "in", "a", "box", "ran", "<pad>", "<pad>"], [-1, 0, 1, 2, 0, -2, -2]),
]
# What the model emits after each node (argmax of its logits at that node).
PREDICTED = [
    ["ran", "on", "a", "mat", "a", "away", "in"],
    ["in", "a", "hat", "the", "away", "<pad>", "<pad>"],
]
PREFIX = [12, 9]  # tokens already in each row's KV cache; node 0 sits at position PREFIX


def _words(ids: list[int]) -> str:
    return " ".join(WORDS[i] if i >= 0 else "." for i in ids)


def run_demo(device: str = "cpu") -> None:
    """Prints what each primitive does on the worked example."""
    draft = torch.tensor([[ID[w] for w in row] for row, _ in TREES], device=device)
    parents = torch.tensor([p for _, p in TREES], device=device)
    predicted = torch.tensor([[ID[w] for w in row] for row in PREDICTED], device=device)
    B, T = draft.shape
    dev = torch.device(device)
    print(f"fastdecode primitives on a worked example ({B} rows, T={T} draft nodes, {device})\n")
    for b in range(B):
        print(f"row {b}: draft tree tokens  {_words(draft[b].tolist())}")
        print(f"       parents            {parents[b].tolist()}  (-1 root, -2 padding)")
        print(f"       model predicts     {_words(predicted[b].tolist())}  (after each node)")

    res = verify_tree(draft, parents, predicted)
    print(f"\nverify_tree  [{_backend.select('verify_tree', dev)[0]} backend]: "
          "a node is accepted when its parent is and its token is what the model "
          "predicted after its parent")
    for b in range(B):
        n = int(res.accept_len[b])
        print(f"  row {b}: accept_len={n} best_node={int(res.best_node[b])} "
              f"path={res.path[b].tolist()} -> append '{_words(res.tokens[b, :n + 1].tolist())}' "
              f"({n} drafted + 1 bonus token)")

    mask = tree_mask(parents)
    print(f"\ntree_mask  [{_backend.select('tree_mask', dev)[0]} backend]: "
          "row i may attend to column j when j is i or an ancestor of i (row 0 shown)")
    for i in range(T):
        print("  " + " ".join("x" if v else "." for v in mask[0, i].tolist()) + f"   node {i}")
    packed = pack_tree_mask(mask)
    print(f"\npack_tree_mask  [{_backend.select('pack_tree_mask', dev)[0]} backend]: "
          f"32 columns per int32 word (bit j = column j), shape {tuple(packed.shape)}; row 0: "
          + ", ".join(f"0b{int(w):07b}" for w in packed[0, :, 0].tolist()))

    positions = tree_positions(parents, torch.tensor(PREFIX, device=device))
    print(f"\ntree_positions  [{_backend.select('tree_positions', dev)[0]} backend]: "
          "prefix length + depth, per row")
    for b in range(B):
        print(f"  row {b} (prefix {PREFIX[b]}): {positions[b].tolist()}")

    S, H, D = max(PREFIX) + T, 1, 1
    rows = torch.arange(S, dtype=torch.float32, device=device)
    cache = rows.repeat(B, H, 1)[..., None].expand(B, H, S, D).contiguous()  # row s holds s
    start = torch.tensor(PREFIX, device=device)
    compact_kv([cache], start, res.path, res.accept_len + 1)
    print(f"\ncompact_kv  [{_backend.select('compact_kv', dev)[0]} backend]: the accepted "
          "path's KV rows move, in place, right after the prefix (each cache row s held s)")
    for b in range(B):
        n = int(res.accept_len[b]) + 1
        moved = cache[b, 0, PREFIX[b]:PREFIX[b] + n, 0].long().tolist()
        print(f"  row {b}: rows {PREFIX[b]}..{PREFIX[b] + n - 1} now hold {moved}; "
              f"crop the cache to {PREFIX[b] + n} rows next")
