"""structure_model: swapping a transformers Llama / Qwen2 model's MLPs for structured FFNs
keeps it running, skips layer 0, and computes the same logits at full rank."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from fastdecode.hf.structure import structure_model  # noqa: E402
from fastdecode.nn.ffn import StructuredFFN  # noqa: E402


def tiny(model_type: str, mlp_bias: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    common = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    if model_type == "llama":
        config = transformers.LlamaConfig(mlp_bias=mlp_bias, **common)
        model = transformers.LlamaForCausalLM(config)
    else:
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    model = model.double().eval()
    if mlp_bias:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_()
    return model


IDS = torch.tensor([[1, 5, 9, 33, 2, 7, 60, 11]])


@pytest.mark.parametrize("model_type,mlp_bias", [("llama", False), ("llama", True),
                                                 ("qwen2", False)])
@pytest.mark.parametrize("kind,rank,blocks,gate_up", [
    ("lowrank", 32, None, "fused"), ("lowrank", 32, None, "separate"),
    ("blockdense", 32, 1, "fused"), ("blockshuffle", None, 1, "fused")])
def test_full_rank_is_exact(model_type: str, mlp_bias: bool, kind: str, rank, blocks,
                            gate_up: str) -> None:
    model = tiny(model_type, mlp_bias)
    with torch.no_grad():
        expected = model(IDS).logits
        assert structure_model(model, kind, rank, blocks, gate_up=gate_up) == [1, 2]
        layers = model.model.layers
        assert not isinstance(layers[0].mlp, StructuredFFN)
        assert all(isinstance(layer.mlp, StructuredFFN) for layer in layers[1:])
        torch.testing.assert_close(model(IDS).logits, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kind,rank,blocks", [("lowrank", 8, None), ("blockdense", 8, 4),
                                              ("blockshuffle", None, 4)])
def test_reduced_model_runs_and_trains(kind: str, rank, blocks) -> None:
    model = tiny("llama").float().train()
    dense_ffn = sum(p.numel() for p in model.model.layers[1].mlp.parameters())
    structure_model(model, kind, rank, blocks)
    assert model.model.layers[1].mlp.num_params < dense_ffn
    out = model(IDS, labels=IDS)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert model.model.layers[1].mlp.fc1.factors()[0].grad is not None
    with torch.no_grad():
        generated = model.eval().generate(IDS, max_new_tokens=3, do_sample=False)
    assert generated.shape == (1, IDS.shape[1] + 3)


def test_bad_arguments() -> None:
    model = tiny("llama")
    with pytest.raises(ValueError, match="rank"):
        structure_model(model, "lowrank", rank=40)
    assert not isinstance(model.model.layers[1].mlp, StructuredFFN)  # nothing changed
    with pytest.raises(ValueError, match="blocks"):
        structure_model(model, "blockshuffle", blocks=5)
    with pytest.raises(TypeError, match="Llama or Qwen2"):
        structure_model(torch.nn.Linear(2, 2), "lowrank", rank=2)
