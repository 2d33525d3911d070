import weakref

import pytest
import torch
from torch import nn

import reparam
from reparam import ConfigError, LowRankLinear
from reparam.calibration import collect_stats
from reparam.pipeline import find_blocks

WHITENED = {"method": "low_rank", "rank": 4, "factorizer": "whitened"}


class Block(nn.Module):
    """Three layers reading one tensor (like q/k/v), and a forward that needs a keyword argument."""

    def __init__(self, d=16):
        super().__init__()
        self.q, self.k, self.v, self.out = (nn.Linear(d, d) for _ in range(4))
        self.norm = nn.LayerNorm(d)

    def forward(self, x, mask=None, *, scale):
        a = self.q(x) * self.k(x).sigmoid() + self.v(x)
        if mask is not None:
            a = a * mask[..., None]
        return self.norm(x + scale * self.out(torch.relu(a)))


class Stack(nn.Module):
    def __init__(self, blocks=3):
        super().__init__()
        self.embed = nn.Linear(8, 16)
        self.blocks = nn.ModuleList(Block() for _ in range(blocks))
        self.head = nn.Linear(16, 4)

    def forward(self, x, attention_mask=None):
        h = self.embed(x)
        for block in self.blocks:
            h = block(h, attention_mask, scale=0.5)
        return self.head(h)


def calib(n=3):
    torch.manual_seed(1)
    mask = torch.ones(2, 5)
    mask[1, 3:] = 0
    return [{"x": torch.randn(2, 5, 8), "attention_mask": mask} for _ in range(n)]


def snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()}, [type(m) for m in model.modules()],
            [m.training for m in model.modules()])


def assert_unchanged(model, before):
    state, types, flags = before
    after = model.state_dict()
    assert list(after) == list(state)
    for key in state:
        assert torch.equal(after[key], state[key]), key
    assert [type(m) for m in model.modules()] == types
    assert [m.training for m in model.modules()] == flags


def assert_same_weights(a, b):
    for (key, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(x, y, msg=key)


def twins(blocks=3):
    torch.manual_seed(0)
    model = Stack(blocks)
    other = Stack(blocks)
    other.load_state_dict(model.state_dict())
    return model, other


def test_finds_the_block_stack_holding_the_most_target_layers():
    model = Stack()
    names = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert [n for n, _ in find_blocks(model, names)] == ["blocks.0", "blocks.1", "blocks.2"]
    assert [n for n, _ in find_blocks(model, names, "Block")] == ["blocks.0", "blocks.1", "blocks.2"]
    assert find_blocks(model, {"head"}) == []
    with pytest.raises(ConfigError, match=r"sequential_targets='Blok' is neither a ModuleList in the model nor"):
        find_blocks(model, names, "Blok")


def test_sequential_equals_one_pass_with_one_block():
    sequential, one_pass = twins(blocks=1)
    recipe = {"blocks.*": WHITENED}
    reparam.convert(sequential, recipe, calib=calib(), pipeline="sequential", progress=False)
    reparam.convert(one_pass, recipe, calib=calib(), pipeline="one_pass", progress=False)
    assert isinstance(sequential.blocks[0].q, LowRankLinear)
    assert_same_weights(sequential, one_pass)


def test_sequential_calibrates_each_block_on_the_converted_blocks_before_it():
    # Reference: convert the blocks one at a time, each calibrated by a whole-model pass.
    sequential, by_hand = twins()
    reparam.convert(sequential, {"blocks.*": WHITENED, "head": WHITENED}, calib=calib(), pipeline="sequential",
                    progress=False)
    for i in range(3):
        reparam.convert(by_hand, {f"blocks.{i}.*": WHITENED}, calib=calib(), pipeline="one_pass", progress=False)
    reparam.convert(by_hand, {"head": WHITENED}, calib=calib(), progress=False)
    assert_same_weights(sequential, by_hand)
    # ... which is not what one pass on the unconverted model gives.
    _, one_pass = twins()
    reparam.convert(one_pass, {"blocks.*": WHITENED, "head": WHITENED}, calib=calib(), pipeline="one_pass",
                    progress=False)
    assert torch.equal(one_pass.blocks[0].q.u, sequential.blocks[0].q.u)
    assert not torch.allclose(one_pass.blocks[2].q.u, sequential.blocks[2].q.u)


def test_sequential_dense_has_the_statistics_of_one_pass():
    blockwise, one_pass = twins()
    reparam.convert(blockwise, {"blocks.*": WHITENED}, calib=calib(), pipeline="sequential_dense", progress=False)
    reparam.convert(one_pass, {"blocks.*": WHITENED}, calib=calib(), pipeline="one_pass", progress=False)
    assert_same_weights(blockwise, one_pass)


@pytest.mark.parametrize("pipeline", ["sequential", "sequential_dense"])
@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
def test_error_in_the_middle_block_restores_the_whole_model(monkeypatch, error, pipeline):
    model = Stack()
    model.blocks[1].norm.eval()  # a submodule with its own flag
    before = snapshot(model)
    fit = LowRankLinear.fit
    calls = []

    def failing_fit(self, weight, stats):
        calls.append(1)
        if len(calls) == 6:  # the second layer of the second block
            raise error
        fit(self, weight, stats)

    monkeypatch.setattr(LowRankLinear, "fit", failing_fit)
    with pytest.raises(type(error)):
        reparam.convert(model, {"blocks.*": WHITENED}, calib=calib(), pipeline=pipeline, progress=False)
    assert len(calls) == 6
    assert_unchanged(model, before)


def test_layers_reading_one_tensor_share_statistics():
    model = Stack(blocks=1)
    block = model.blocks[0]
    data = calib()
    stats = collect_stats(model, data, {"blocks.0.q": block.q, "blocks.0.k": block.k, "blocks.0.out": block.out},
                          progress=False)
    assert stats["blocks.0.q"] is stats["blocks.0.k"] and stats["blocks.0.q"] is not stats["blocks.0.out"]
    inputs = []
    handle = block.q.register_forward_pre_hook(lambda m, args: inputs.append(args[0]))
    with torch.no_grad():
        for batch in data:
            model(**batch)
    handle.remove()
    x = torch.cat([h[batch["attention_mask"].bool()] for h, batch in zip(inputs, data)]).double()
    torch.testing.assert_close(stats["blocks.0.k"].gram, x.T @ x)
    assert stats["blocks.0.k"].count == x.shape[0]


@pytest.mark.parametrize("pipeline", ["sequential", "sequential_dense", "one_pass"])
def test_train_eval_flags_are_kept_and_new_layers_take_their_predecessors(pipeline):
    model = Stack()
    model.train()
    model.blocks[0].eval()  # e.g. a frozen part
    flags = {name: m.training for name, m in model.named_modules()}
    reparam.convert(model, {"blocks.*": WHITENED}, calib=calib(), pipeline=pipeline, progress=False)
    assert {name: m.training for name, m in model.named_modules()} == flags
    assert isinstance(model.blocks[1].q, LowRankLinear)


def test_sequential_needs_a_block_stack():
    with pytest.raises(ConfigError, match=r"pipeline='sequential' found no stack of repeated blocks holding "
                                          r"calibrated layers; name it with sequential_targets="):
        reparam.convert(Stack(), {"head": WHITENED}, calib=calib(), pipeline="sequential", progress=False)
    with pytest.raises(ConfigError, match=r"pipeline='sequential' needs calibration data \(calib=\)"):
        reparam.convert(Stack(), {"head": {"method": "low_rank", "rank": 2}}, pipeline="sequential",
                        progress=False)


def test_meta_device_model_is_a_clear_error():
    with torch.device("meta"):
        model = Stack()
    with pytest.raises(ConfigError, match=r"layer 'blocks.0.q' \(and 11 more\) is on the meta device: it has no "
                                          r"weights to convert. Load the weights first"):
        reparam.convert(model, {"blocks.*": {"method": "low_rank", "rank": 2}}, progress=False)


def test_report_counts_supported_modules_left_untouched():
    report = reparam.convert(Stack(), {"blocks.0.*": {"method": "low_rank", "rank": 2}, "blocks.1.q": None},
                             progress=False)
    assert len(report.layers) == 4
    assert report.untouched == {"Linear": 10}
    assert "left untouched (supported by the recipe's methods, not selected): 10 Linear" in str(report)


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.body = nn.Linear(8, 8)
        self.lm_head = nn.Linear(8, 10, bias=False)
        self.lm_head.weight = self.embed.weight
        self.alias = self.body  # one module under two names

    def forward(self, ids):
        return self.lm_head(self.body(self.embed(ids)))


def test_tied_weight_is_left_alone_by_a_compression_method():
    model = Tied()
    with pytest.warns(UserWarning, match=r"layer 'lm_head' shares its weight with 'embed' \(tied weights\); "
                                         r"'low_rank' would store a second copy"):
        report = reparam.convert(model, {"lm_head": {"method": "low_rank", "rank": 2}}, progress=False)
    assert report.layers == [] and type(model.lm_head) is nn.Linear
    assert model.lm_head.weight is model.embed.weight


def test_in_place_method_on_a_tied_weight_is_refused():
    model = Tied()
    before = snapshot(model)
    with pytest.raises(ConfigError, match=r"layer 'lm_head' shares its weight with 'embed' \(tied weights\); "
                                          r"'compander' changes the weight in place and would change 'embed' too"):
        reparam.convert(model, {"lm_head": {"method": "compander"}}, progress=False)
    assert_unchanged(model, before)


def test_module_under_two_names_is_converted_once_for_both():
    model = Tied()
    report = reparam.convert(model, {"body": {"method": "low_rank", "rank": 2},
                                     "alias": {"method": "low_rank", "rank": 2}}, progress=False)
    assert isinstance(model.body, LowRankLinear) and model.alias is model.body
    assert [r.name for r in report.layers] == ["body"]
    with pytest.raises(ConfigError, match=r"module 'body' is also registered as 'alias' \(one module under two "
                                          r"names\), and the recipe converts it as 'body' but not the same way"):
        reparam.convert(Tied(), {"body": {"method": "low_rank", "rank": 2}}, progress=False)


def test_statistics_are_freed_as_soon_as_their_layers_are_fitted(monkeypatch):
    seen, alive = [], []
    fit = LowRankLinear.fit

    def spy(self, weight, stats):
        alive.append(sum(ref() is not None for ref in seen))
        seen.append(weakref.ref(stats))
        fit(self, weight, stats)

    monkeypatch.setattr(LowRankLinear, "fit", spy)
    reparam.convert(Stack(), {"blocks.*": WHITENED}, calib=calib(), progress=False)  # auto: block by block
    # q, k, v share one LayerStats (alive until v is fitted); out has its own; nothing outlives its block
    assert alive == [0, 1, 2, 0] * 3


class Reversed(Stack):
    def forward(self, x, attention_mask=None):
        h = self.embed(x)
        for block in reversed(self.blocks):
            h = block(h, attention_mask, scale=0.5)
        return self.head(h)


def test_blocks_that_do_not_run_in_order_fall_back_to_one_pass_under_auto():
    torch.manual_seed(0)
    auto, one_pass = Reversed(), Reversed()
    one_pass.load_state_dict(auto.state_dict())
    reparam.convert(auto, {"blocks.*": WHITENED}, calib=calib(), progress=False)
    reparam.convert(one_pass, {"blocks.*": WHITENED}, calib=calib(), pipeline="one_pass", progress=False)
    assert_same_weights(auto, one_pass)
    model = Reversed()
    before = snapshot(model)
    with pytest.raises(ConfigError, match=r"sequential conversion needs every block to run once per forward, in "
                                          r"order; block 2 ran after 0 block\(s\). Use pipeline='one_pass'"):
        reparam.convert(model, {"blocks.*": WHITENED}, calib=calib(), pipeline="sequential", progress=False)
    assert_unchanged(model, before)


def test_converted_blocks_keep_no_forward_caches_once_they_have_run():
    model = Stack()
    reparam.convert(model, {"blocks.*": {"method": "dense_sparse", "atoms": 8, "nnz": 3}}, calib=calib(),
                    pipeline="sequential", progress=False)
    layers = [m for m in model.blocks.modules() if isinstance(m, reparam.DenseSparseLinear)]
    assert len(layers) == 12
    # Blocks 0 and 1 ran converted (to calibrate the next); the last one never did.
    assert not any(m.CACHES[0] in m.__dict__ for m in layers)
    x = torch.randn(2, 5, 16)
    model.eval()  # the inference path, which keeps the cache
    with torch.no_grad():
        y = model.blocks[0](x, scale=0.5)
        assert all(m.CACHES[0] in m.__dict__ for m in layers[:4])
        for m in layers[:4]:
            m.release_caches()
        assert not any(m.CACHES[0] in m.__dict__ for m in layers[:4])
        torch.testing.assert_close(model.blocks[0](x, scale=0.5), y, rtol=0, atol=0)
