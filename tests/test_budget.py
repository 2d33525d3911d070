import itertools

import pytest
import torch
from safetensors import safe_open
from torch import nn

import reparam
from reparam.core.budget import Option, choose, weight_nbytes
from reparam.core.config import ConfigError
from reparam.core.quantized import default_group_size
from reparam.io import converted_modules


def brute_force(options, budget):
    best = None
    for combo in itertools.product(*options.values()):
        if sum(o.size for o in combo) <= budget:
            error = sum(o.error for o in combo)
            best = error if best is None else min(best, error)
    return best


@pytest.mark.parametrize("seed", range(30))
def test_knapsack_matches_brute_force(seed):
    gen = torch.Generator().manual_seed(seed)
    layers = int(torch.randint(1, 5, (), generator=gen))
    options = {f"l{i}": [Option(j, int(torch.randint(1, 40, (), generator=gen)), float(torch.rand((), generator=gen)))
                         for j in range(int(torch.randint(1, 5, (), generator=gen)))] for i in range(layers)}
    smallest = sum(min(o.size for o in opts) for opts in options.values())
    budget = smallest + int(torch.randint(0, 60, (), generator=gen))
    chosen = choose(options, budget)
    assert sum(o.size for o in chosen.values()) <= budget
    assert all(chosen[name] in opts for name, opts in options.items())
    assert sum(o.error for o in chosen.values()) == pytest.approx(brute_force(options, budget), abs=1e-12)


def test_knapsack_rounds_large_sizes_up_and_never_exceeds_the_budget():
    gen = torch.Generator().manual_seed(0)
    options = {f"l{i}": [Option(j, int(torch.randint(10_000, 10_000_000, (), generator=gen)),
                                float(torch.rand((), generator=gen))) for j in range(6)] for i in range(50)}
    budget = sum(sorted(o.size for o in opts)[2] for opts in options.values())
    chosen = choose(options, budget, resolution=1000)
    assert sum(o.size for o in chosen.values()) <= budget


def test_a_budget_exactly_at_the_smallest_choice_is_met_however_sizes_round():
    gen = torch.Generator().manual_seed(1)
    options = {f"l{i}": [Option(j, int(torch.randint(10_000, 10_000_000, (), generator=gen)),
                                float(torch.rand((), generator=gen))) for j in range(4)] for i in range(30)}
    floors = {name: min(opts, key=lambda o: o.size) for name, opts in options.items()}
    assert choose(options, sum(o.size for o in floors.values()), resolution=1000) == floors


def test_an_infeasible_budget_names_the_smallest_choice():
    options = {"a": [Option(0, 10, 1.0), Option(1, 20, 0.5)], "b": [Option(0, 7, 1.0)]}
    with pytest.raises(ConfigError, match="the size budget 16 is below the smallest choice, 17; raise the budget"):
        choose(options, 16)


def test_default_group_size_divides_the_width_when_it_can():
    assert [default_group_size(n) for n in (384, 576, 1536, 96, 100)] == [128, 64, 128, 32, 128]
    layer = reparam.apply(nn.Linear(576, 8), {"method": "affine", "bits": 4, "fit": "rtn"})
    assert layer.config.group_size == 64 and layer.params.shape == (8, 9, 2)


@pytest.mark.parametrize("in_features, group_size", [(384, 384), (100, 128)])
def test_row_groups_give_each_row_one_set_of_scales(in_features, group_size):
    linear = nn.Linear(in_features, 16)
    layer = reparam.apply(linear, {"method": "shift_add", "bits": 3, "group_size": "row", "fit": "rtn"})
    # stored concretely, so the saved config rebuilds the layer without knowing what "row" meant
    assert layer.config.group_size == group_size and layer.params.shape == (16, 1, 3)
    assert weight_nbytes(layer) == 16 * (3 * group_size // 8 + 3 * 2)  # planes and three fp16 α per row
    x = torch.randn(5, in_features)
    torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.weight, layer.bias))


class Net(nn.Module):
    """Layers of unlike sensitivity: a low-rank weight, a heavy-tailed one, a plain one."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(64, 96)
        self.b = nn.Linear(96, 64)
        self.c = nn.Linear(64, 64, bias=False)
        with torch.no_grad():
            self.a.weight.copy_(torch.randn(96, 4) @ torch.randn(4, 64) / 8 + 1e-3 * torch.randn(96, 64))
            self.b.weight.copy_(torch.distributions.StudentT(2.0).sample((64, 96)) / 10)

    def forward(self, x):
        return self.c(self.b(torch.relu(self.a(x))))


def calibration():
    return [torch.randn(64, 64) * torch.linspace(0.2, 2, 64) for _ in range(4)]


def stored_bits(model):
    modules = dict(model.named_modules())
    names = list(converted_modules(model))
    return 8 * sum(weight_nbytes(modules[n]) for n in names) / sum(modules[n].weight.numel() for n in names)


CANDIDATES = [{"method": "affine", "bits": b} for b in (2, 3, 4, 8)] + [
    {"method": "low_rank", "rank": 4},
    {"method": "qera", "base": {"method": "affine", "bits": 2}, "rank": 4},
]


@pytest.mark.parametrize("target", [{"target_bits": 3.0}, {"target_bytes": 6000}])
def test_auto_stays_within_the_budget_on_disk_and_loads_without_statistics(tmp_path, target):
    model = Net()
    config = {"method": "auto", "candidates": CANDIDATES, **target}
    report = reparam.convert(model, {"re:[abc]": config}, calib=calibration(), progress=False)
    path = tmp_path / "model.safetensors"
    reparam.save(model, path)
    with safe_open(str(path), "pt") as file:  # the bytes on disk of the converted layers' weights
        stored = sum(file.get_tensor(k).numel() * file.get_tensor(k).element_size()
                     for k in file.keys() if not k.endswith("bias"))
    weights = 96 * 64 + 64 * 96 + 64 * 64
    assert stored <= target.get("target_bytes", target.get("target_bits", 0) * weights / 8)
    assert {r.config["method"] for r in report.layers} <= {c["method"] for c in CANDIDATES}
    assert all(r.config["method"] != "auto" for r in report.layers)
    fresh = Net()
    reparam.load(fresh, path)
    x = torch.randn(5, 64)
    assert torch.equal(fresh(x), model(x))


def output_errors(model, reference, calib):
    stats = {}
    for name in ("a", "b", "c"):
        x = torch.cat([_inputs(reference, name, batch) for batch in calib])
        stats[name] = reparam.LayerStats.from_inputs(x).output_error(
            getattr(reference, name).weight, getattr(model, name).weight) ** 2
    return sum(stats.values())


def _inputs(model, name, batch):
    seen = []
    handle = getattr(model, name).register_forward_hook(lambda m, i, o: seen.append(i[0]))
    model(batch)
    handle.remove()
    return seen[0]


def test_auto_beats_every_single_candidate_that_fits_the_budget():
    torch.manual_seed(0)
    reference, calib = Net(), calibration()
    target = 3.6
    candidates = [{"method": "affine", "bits": b} for b in (2, 3, 4)] + [
        {"method": "low_rank", "rank": 2}, {"method": "qera", "base": {"method": "affine", "bits": 2}, "rank": 2}]
    model = Net()
    model.load_state_dict(reference.state_dict())
    reparam.convert(model, {"re:[abc]": {"method": "auto", "target_bits": target, "candidates": candidates}},
                    calib=calib, progress=False)
    assert stored_bits(model) <= target
    auto_error = output_errors(model, reference, calib)
    fitting = 0
    for candidate in candidates:
        single = Net()
        single.load_state_dict(reference.state_dict())
        reparam.convert(single, {"re:[abc]": candidate}, calib=calib, progress=False)
        if stored_bits(single) <= target:
            fitting += 1
            assert auto_error < output_errors(single, reference, calib), candidate
    assert fitting >= 2


def test_without_calibration_the_weight_error_decides():
    # Room for 8 bits in one of two layers: it goes to the one 2 bits fit badly, not to the first.
    model = nn.Sequential(nn.Linear(64, 64, bias=False), nn.Linear(64, 64, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.randint(-1, 3, (64, 64)).float())  # four levels: exact at 2 bits
        model[0].weight[:, ::16] = torch.tensor([-1.0, 2.0]).repeat(32)[:, None]  # every group spans them
    candidates = [{"method": "affine", "bits": 2}, {"method": "affine", "bits": 8}]
    reparam.convert(model, {"Linear": {"method": "auto", "target_bits": 6.0, "candidates": candidates}},
                    progress=False)
    assert [m.config.bits for m in model] == [2, 8]
    assert torch.equal(model[0].weight, model[0].weight.round())


def test_shift_add_auto_bits_share_the_allocator_and_its_budget():
    model = Net()
    reparam.convert(model, {"re:[abc]": {"method": "shift_add", "bits": "auto", "target_bits": 3.0, "fit": "rtn"}},
                    calib=calibration(), progress=False)
    bits = sorted(model.get_submodule(n).config.bits for n in "abc")
    assert stored_bits(model) <= 3.0 and bits[0] < bits[-1]


@pytest.mark.parametrize("config, message", [
    ({"method": "auto"}, "auto: set exactly one of target_bits (stored bits per weight) or target_bytes"),
    ({"method": "auto", "target_bits": 3, "target_bytes": 10},
     "auto: set exactly one of target_bits (stored bits per weight) or target_bytes"),
    ({"method": "auto", "target_bits": -1}, "auto: target_bits=-1 must be a positive number"),
    ({"method": "auto", "target_bits": 3, "candidates": []},
     "auto: candidates is empty; list method configs to choose from, or drop it"),
    ({"method": "auto", "target_bits": 3, "candidates": [{"method": "auto", "target_bits": 2}]},
     "auto: a candidate cannot itself be 'auto'"),
])
def test_config_errors(config, message):
    with pytest.raises(ConfigError) as err:
        reparam.convert(Net(), {"a": config}, progress=False)
    assert str(err.value) == message


def test_a_budget_below_every_candidate_is_an_error_before_anything_changes():
    model = Net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match="below the smallest choice"):
        reparam.convert(model, {"re:[abc]": {"method": "auto", "target_bits": 1.0, "candidates": CANDIDATES[:2]}},
                        calib=calibration(), progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(type(m) is nn.Linear for m in (model.a, model.b, model.c))


def test_apply_to_one_layer_spends_that_layers_budget():
    linear = nn.Linear(64, 64)
    stats = reparam.LayerStats.from_inputs(torch.randn(256, 64))
    candidates = [{"method": "affine", "bits": b} for b in (2, 3, 4, 8)]
    layer = reparam.apply(linear, {"method": "auto", "target_bits": 4.9, "candidates": candidates}, stats)
    assert (layer.config.method, layer.config.bits, layer.config.group_size) == ("affine", 4, 64)  # 4.5 bits


class Branches(nn.Module):
    """Two identical layers whose outputs the model weighs 1 and 10: only the sensitivity tells them apart."""

    def __init__(self):
        super().__init__()
        self.quiet, self.loud = nn.Linear(64, 64, bias=False), nn.Linear(64, 64, bias=False)
        with torch.no_grad():
            self.loud.weight.copy_(self.quiet.weight)

    def forward(self, x):
        return self.quiet(x) + 10 * self.loud(x)


def test_calibrated_auto_spends_the_bits_where_the_models_output_feels_them():
    torch.manual_seed(0)
    model = Branches()
    candidates = [{"method": "affine", "bits": 2, "fit": "rtn"}, {"method": "affine", "bits": 6, "fit": "rtn"}]
    rule = {"method": "auto", "target_bits": 4.5, "candidates": candidates}  # room for 6 bits in one layer
    reparam.convert(model, {"re:quiet|loud": rule}, calib=[torch.randn(32, 64) for _ in range(2)], progress=False)
    assert (model.quiet.config.bits, model.loud.config.bits) == (2, 6)


class Residual(nn.Module):
    def __init__(self, scale: float):
        super().__init__()
        self.scale, self.linear = scale, nn.Linear(64, 64, bias=False)

    def forward(self, h):
        return h + self.scale * self.linear(h)


class TwoBlocks(nn.Module):
    """Two alike blocks; the first one's output counts 100 times more (scale 10 against 0.1)."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Residual(10.0), Residual(0.1)])
        with torch.no_grad():
            self.blocks[1].linear.weight.copy_(self.blocks[0].linear.weight)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


@pytest.mark.parametrize("pipeline", ["sequential", "one_pass"])
def test_block_by_block_conversion_spends_one_budget_across_blocks(pipeline):
    torch.manual_seed(0)
    model = TwoBlocks()
    candidates = [{"method": "affine", "bits": 2}, {"method": "affine", "bits": 6}]
    rule = {"method": "auto", "target_bits": 4.5, "candidates": candidates}  # room for 6 bits in one block
    reparam.convert(model, {"re:blocks\\..*linear": rule}, calib=[torch.randn(32, 64) for _ in range(2)], pipeline=pipeline,
                    progress=False)
    # A budget per block would give both blocks the same width.
    assert [block.linear.config.bits for block in model.blocks] == [6, 2]
