"""The Hugging Face round trip: a converted transformers model's own
save_pretrained writes the compressed tensors and the recipe, and
AutoModel*.from_pretrained rebuilds the converted modules from the folder alone."""
import json
import os
import struct
import subprocess
import sys
import types

import pytest
import torch
from torch.nn.utils import parametrize

import reparam

transformers = pytest.importorskip("transformers")
from transformers import AutoModel, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402

from reparam.integrations import hf  # noqa: E402

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

TINY_LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, tie_word_embeddings=True)
MIXED = {  # every compression method, data-free
    "model.layers.0.self_attn.[qk]_proj": {"method": "low_rank", "size_ratio": 0.5},
    "model.layers.0.self_attn.[vo]_proj": {"method": "affine", "bits": 4, "group_size": 32},
    "model.layers.1.self_attn.*": {"method": "dense_sparse", "size_ratio": 0.5},
    "model.layers.*.mlp.*": {"method": "shift_add", "bits": 2, "group_size": 32},
}
TOKENS = torch.tensor([[1, 5, 9, 33, 2, 127, 64, 8], [3, 3, 100, 7, 0, 12, 90, 45]])


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Tiny layers: threads only add overhead (25 s instead of 0.6 s for MIXED on a loaded 2-core box).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_llama() -> LlamaForCausalLM:
    return LlamaForCausalLM(LlamaConfig(**TINY_LLAMA)).eval()


@torch.no_grad()
def logits(model) -> torch.Tensor:
    return model(TOKENS).logits


def stored_bytes(path) -> dict[str, int]:
    """Bytes of each tensor in a safetensors file, from its header."""
    with open(path, "rb") as file:
        header = json.loads(file.read(struct.unpack("<Q", file.read(8))[0]))
    return {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}


def tensor_bytes(model) -> dict[str, int]:
    return {k: t.numel() * t.element_size() for k, t in model.state_dict().items()}


def converted_types(model) -> dict[str, type]:
    converted = reparam.converted_modules(model)
    return {name: type(module) for name, module in model.named_modules() if name in converted}


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory):
    model = tiny_llama()
    dense = tensor_bytes(model)
    reparam.convert(model, MIXED, progress=False)
    folder = tmp_path_factory.mktemp("llama")
    model.save_pretrained(folder)
    return model, folder, dense


def test_llama_round_trip_is_exact_from_the_folder_alone(saved_llama):
    model, folder, _ = saved_llama
    loaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert torch.equal(logits(loaded), logits(model))
    assert converted_types(loaded) == converted_types(model) and len(converted_types(model)) == 14
    assert loaded.state_dict().keys() == model.state_dict().keys()
    for key, tensor in model.state_dict().items():  # stored as converted: nothing dequantized or recast
        assert loaded.state_dict()[key].dtype == tensor.dtype and torch.equal(loaded.state_dict()[key], tensor), key
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # the tie the recipe left alone


def test_sharded_checkpoint_as_push_to_hub_writes_it(saved_llama, tmp_path):
    # push_to_hub uploads what save_pretrained(tmp, max_shard_size=...) writes.
    model, _, _ = saved_llama
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path).eval()), logits(model))


def test_llama_checkpoint_has_the_compressed_size_and_the_recipe(saved_llama):
    model, folder, dense = saved_llama
    stored = stored_bytes(folder / "model.safetensors")
    # Every tensor exactly as the model holds it (packed planes, fp16 parameters, int indices), the
    # tied lm_head once; nothing else.
    assert stored == {k: n for k, n in tensor_bytes(model).items() if k != "lm_head.weight"}
    layers = sum(n for k, n in stored.items() if k.startswith("model.layers."))
    dense_layers = sum(n for k, n in dense.items() if k.startswith("model.layers."))
    assert layers < 0.3 * dense_layers
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert config == {"quant_method": "reparam", "format_version": reparam.io.FORMAT_VERSION,
                      "modules": {n: c.to_dict() for n, c in reparam.converted_modules(model).items()}}


def test_minilm_round_trip(tmp_path):
    from reparam import minilm

    model = minilm.load_model()
    dense = tensor_bytes(model)
    reparam.convert(model, {minilm.ENCODER_LINEARS: {"method": "affine", "bits": 4, "fit": "rtn"}}, progress=False)
    model.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    batch = minilm.batches(minilm.heldout_sentences(4))[0]
    assert torch.equal(minilm.embed(loaded, [batch]), minilm.embed(model, [batch]))
    assert converted_types(loaded) == converted_types(model) and len(converted_types(model)) == 36
    stored = stored_bytes(tmp_path / "model.safetensors")
    assert stored == tensor_bytes(model)
    encoder = sum(n for k, n in stored.items() if k.startswith("encoder."))
    dense_encoder = sum(n for k, n in dense.items() if k.startswith("encoder."))
    assert encoder < 0.16 * dense_encoder  # 4 bits plus fp16 group parameters and fp32 biases, norms


def test_training_time_methods_round_trip_parametrized(tmp_path):
    model = tiny_llama()
    reparam.convert(model, {"model.layers.0.mlp.*": {"method": "compander", "learnable": True},
                            "model.layers.1.mlp.*": {"method": "scale_vector"}}, progress=False)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(logits(loaded), logits(model))
    assert parametrize.is_parametrized(loaded.model.layers[0].mlp.up_proj, "weight")
    assert reparam.converted_modules(loaded) == reparam.converted_modules(model)


def test_saved_recipe_is_the_model_as_it_is_at_save_time(tmp_path):
    model = tiny_llama()
    reparam.convert(model, {"model.layers.*.mlp.*": {"method": "compander"}}, progress=False)
    reparam.convert(model, {"model.layers.1.self_attn.q_proj": {"method": "low_rank", "rank": 8}}, progress=False)
    reparam.fold(model)  # the companders are plain Linear layers again
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]["modules"]
    assert saved == {"model.layers.1.self_attn.q_proj": reparam.LowRankConfig(rank=8).to_dict()}
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(logits(loaded), logits(model))


def test_a_tied_lm_head_stays_tied_and_an_untied_one_compresses(tmp_path):
    model = tiny_llama()
    with pytest.warns(UserWarning, match="shares its weight with 'model.embed_tokens'"):
        reparam.convert(model, {"lm_head": {"method": "low_rank", "rank": 8}}, progress=False, strict=False)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # left alone: never stored twice

    # Untied by the user first: compressed, and loading must not tie the dense embedding back onto it.
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    reparam.convert(model, {"lm_head": {"method": "low_rank", "rank": 8}}, progress=False)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded.lm_head, reparam.LowRankLinear) and "lm_head.weight" not in loaded.all_tied_weights_keys
    assert torch.equal(logits(loaded), logits(model))


def test_a_model_dequantized_from_gguf_saves_as_a_reparam_model(tmp_path):
    from transformers import GgufConfig
    from transformers.quantizers.auto import AutoHfQuantizer

    model = tiny_llama()
    model.hf_quantizer = AutoHfQuantizer.from_config(GgufConfig())  # as from_pretrained(gguf_file=...) leaves it
    reparam.convert(model, {"model.layers.0.mlp.*": {"method": "low_rank", "rank": 8}}, progress=False)
    model.save_pretrained(tmp_path)  # GGUF's quantizer refuses to save; the weights were dequantized on load
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path).eval()), logits(model))


def test_a_model_quantized_by_another_method_is_left_alone_with_a_warning():
    model = tiny_llama()
    other = types.SimpleNamespace(quantization_config=types.SimpleNamespace(quant_method="bitsandbytes_4bit"))
    model.hf_quantizer = other
    with pytest.warns(UserWarning, match="also quantized with 'bitsandbytes_4bit'.*Save it with reparam.save"):
        reparam.convert(model, {"model.layers.0.mlp.*": {"method": "low_rank", "rank": 8}}, progress=False)
    assert model.hf_quantizer is other and not hasattr(model.config, "quantization_config")


def test_dequantize_bakes_every_layer_back(tmp_path):
    model = tiny_llama()
    reparam.convert(model, {"model.layers.0.*": {"method": "shift_add", "bits": 3, "group_size": 32},
                            "model.layers.1.mlp.*": {"method": "compander"}}, progress=False)
    expected = logits(model)
    model.dequantize()
    assert not reparam.converted_modules(model) and not model.is_quantized
    assert {type(m) for n, m in model.named_modules() if n.endswith("_proj")} == {torch.nn.Linear}
    torch.testing.assert_close(logits(model), expected, rtol=1e-5, atol=1e-5)
    model.save_pretrained(tmp_path)  # a plain checkpoint again
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())


def test_transformers_trainer_accepts_converted_models(saved_llama):
    from transformers.trainer_utils import validate_quantization_for_training

    model, _, _ = saved_llama
    assert model.is_quantized
    validate_quantization_for_training(model)  # raises for quantized models that cannot train


def test_reparam_save_and_load_keep_working_on_transformers_models(saved_llama, tmp_path):
    model, _, _ = saved_llama
    reparam.save(model, tmp_path / "model.safetensors")
    fresh = tiny_llama()
    reparam.load(fresh, tmp_path / "model.safetensors")
    assert torch.equal(logits(fresh), logits(model))
    fresh.save_pretrained(tmp_path / "again")  # load marked it: its save_pretrained is compressed too
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "again").eval()), logits(model))


@pytest.mark.parametrize("shard", [None, "40KB"])
def test_reparam_load_reads_a_save_pretrained_folder(saved_llama, tmp_path, shard):
    model, folder, _ = saved_llama
    if shard is not None:
        model.save_pretrained(tmp_path, max_shard_size=shard)
        folder = tmp_path
    fresh = reparam.load(tiny_llama(), folder)
    assert torch.equal(logits(fresh), logits(model))
    assert converted_types(fresh) == converted_types(model)
    assert fresh.lm_head.weight is fresh.model.embed_tokens.weight  # not in the files: tied, filled from the embedding


def test_reparam_load_of_a_folder_that_is_not_a_converted_model_says_so(saved_llama, tmp_path):
    tiny_llama().save_pretrained(tmp_path)
    fresh = tiny_llama()
    with pytest.raises(reparam.FileFormatError, match=r"config.json has no reparam quantization_config: the folder "
                                                       r"was not saved from a converted model"):
        reparam.load(fresh, tmp_path)
    _, folder, _ = saved_llama
    with pytest.raises(reparam.FileFormatError, match="for a file written by save_pretrained, pass its folder"):
        reparam.load(fresh, folder / "model.safetensors")
    assert not reparam.converted_modules(fresh)


@pytest.mark.parametrize("change, message", [
    ({"format_version": reparam.io.FORMAT_VERSION + 1}, "is newer than this reparam's"),
    ({"modules": {"lm_head": {"method": "nope"}}}, "unknown method 'nope'"),
])
def test_unreadable_checkpoints_fail_before_loading(saved_llama, tmp_path, change, message):
    _, folder, _ = saved_llama
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"].update(change)
    (tmp_path / "config.json").write_text(json.dumps(config))
    os.symlink(folder / "model.safetensors", tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=message):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_registers_when_the_registry_is_already_imported():
    from transformers.quantizers import auto

    auto.AUTO_QUANTIZER_MAPPING.pop(hf.QUANT_METHOD)
    auto.AUTO_QUANTIZATION_CONFIG_MAPPING.pop(hf.QUANT_METHOD)
    reparam.integrations.register_hf_when_imported()
    assert auto.AUTO_QUANTIZER_MAPPING[hf.QUANT_METHOD] is hf.ReparamHfQuantizer
    assert auto.AUTO_QUANTIZATION_CONFIG_MAPPING[hf.QUANT_METHOD] is hf.ReparamQuantizationConfig


def test_the_import_hook_fires_once_after_the_module_ran(tmp_path, monkeypatch):
    (tmp_path / "hooked_module.py").write_text("VALUE = 42\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    seen = []
    hook = reparam.integrations._AfterImport("hooked_module", lambda: seen.append(sys.modules["hooked_module"].VALUE))
    monkeypatch.setattr(sys, "meta_path", [hook, *sys.meta_path])
    import importlib.util

    assert importlib.util.find_spec("hooked_module") is not None and seen == [] and hook in sys.meta_path
    import hooked_module  # noqa: F401

    assert seen == [42] and hook not in sys.meta_path
    monkeypatch.delitem(sys.modules, "hooked_module")


def test_import_reparam_stays_light_and_registers_when_transformers_loads(saved_llama, tmp_path):
    model, folder, _ = saved_llama
    torch.save(logits(model), tmp_path / "expected.pt")
    script = f"""
import sys, torch, reparam
assert not any(name.split(".")[0] == "transformers" for name in sys.modules), "import reparam imported transformers"
from transformers import AutoModelForCausalLM  # imported after reparam: the import hook registers
model = AutoModelForCausalLM.from_pretrained({str(folder)!r}).eval()
assert isinstance(model.model.layers[0].mlp.up_proj, reparam.ShiftAddLinear)
with torch.no_grad():
    assert torch.equal(model(torch.tensor({TOKENS.tolist()})).logits, torch.load({str(tmp_path / "expected.pt")!r}))
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
