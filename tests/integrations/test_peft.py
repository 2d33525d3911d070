"""LoRA (peft) on compressed layers: wrapped, frozen, trainable, mergeable."""
import pytest
import torch
from torch import nn

import reparam

peft = pytest.importorskip("peft")
from reparam.integrations.peft import CompressedLoraLinear, register  # noqa: E402

RECIPES = {
    "shift_add": {"method": "shift_add", "bits": 3, "group_size": 32},
    "affine": {"method": "affine", "bits": 4, "group_size": 32},
    "low_rank": {"method": "low_rank", "size_ratio": 0.5},
    "dense_sparse": {"method": "dense_sparse", "size_ratio": 0.5},
}


def _compressed(method: str) -> nn.Module:
    model = nn.Sequential(nn.Linear(64, 48), nn.GELU(), nn.Linear(48, 16))
    reparam.convert(model, {"Linear": RECIPES[method]}, progress=False)
    return model


@pytest.mark.parametrize("method", sorted(RECIPES))
def test_lora_wraps_compressed_layers_trains_adapters_and_merges(method):
    model = _compressed(method)
    x, target = torch.randn(32, 64), torch.randn(32, 16)
    before = model(x).detach()
    peft_model = peft.get_peft_model(model, register(peft.LoraConfig(r=4, target_modules=["0", "2"])))
    layers = [m for m in peft_model.modules() if isinstance(m, CompressedLoraLinear)]
    assert len(layers) == 2
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)  # the compressed base is frozen
    torch.testing.assert_close(peft_model(x), before)  # LoRA's B starts at zero

    optimizer = torch.optim.Adam([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(20):
        loss = nn.functional.mse_loss(peft_model(x), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert losses[-1] < 0.9 * losses[0]

    tuned = peft_model(x).detach()
    merged = peft_model.merge_and_unload()
    assert all(type(m) is nn.Linear for m in (merged[0], merged[2]))  # merging bakes W + ΔW into dense layers
    torch.testing.assert_close(merged(x), tuned, atol=1e-4, rtol=1e-4)


def test_register_rejects_other_configs():
    with pytest.raises(TypeError, match="register takes a peft.LoraConfig, got dict"):
        register({"r": 8})


def test_lora_fine_tunes_shift_add_minilm(minilm):
    """QLoRA-style: 3-bit shift-add MiniLM distilled towards the dense embeddings with LoRA on every layer."""
    from reparam.minilm import mean_pool

    model = minilm.fresh_model()
    reparam.convert(model, {minilm.layers: {"method": "shift_add", "bits": 3, "fit": "rtn"}}, progress=False)
    config = register(peft.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "key", "value", "dense"]))
    model = peft.get_peft_model(model, config)
    assert sum(isinstance(m, CompressedLoraLinear) for m in model.modules()) == 36
    teacher = reparam.minilm.load_model()
    batch = minilm.calib[0]
    with torch.no_grad():
        target = mean_pool(teacher, batch)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(8):
        loss = 1 - nn.functional.cosine_similarity(mean_pool(model, batch), target).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert losses[-1] < 0.8 * losses[0]


def test_convert_leaves_peft_adapters_alone_unless_named():
    model = nn.Sequential(nn.Linear(64, 48), nn.GELU(), nn.Linear(48, 16))
    peft_model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["0"]))
    report = reparam.convert(peft_model, {"Linear": {"method": "low_rank", "rank": 4}}, progress=False)
    assert sorted(r.name for r in report.layers) == ["base_model.model.0.base_layer", "base_model.model.2"]
    named = "base_model.model.0.lora_A.default"
    report = reparam.convert(peft_model, {named: {"method": "low_rank", "rank": 2}}, progress=False)
    assert [r.name for r in report.layers] == [named]
