"""Conversion across processes: collectives checked with 2 real gloo processes on CPU."""
import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from reparam.core.stats import LayerStats
from reparam.distributed import SPLIT, assign, row_slices

WORKER = Path(__file__).with_name("distributed_worker.py")


def _run(scenario: str, folder: Path, world: int = 2, timeout: float = 120) -> list[dict]:
    """Run ``world`` ranks of a worker scenario; returns each rank's report (None where it wrote none)."""
    processes = [subprocess.Popen([sys.executable, str(WORKER), scenario, str(rank), str(world), str(folder)],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for rank in range(world)]
    for process in processes:
        process.communicate(timeout=timeout)
    reports = [folder / f"rank{rank}.json" for rank in range(world)]
    return [json.loads(r.read_text()) if r.exists() else None for r in reports]


def test_assign_balances_costs_and_is_deterministic():
    costs = [5.0, 1.0, 4.0, 3.0, 3.0, 2.0]
    owners = assign(costs, 2)
    loads = [sum(c for c, o in zip(costs, owners) if o == r) for r in range(2)]
    assert sorted(loads) == [9.0, 9.0]
    assert assign(costs, 2) == owners
    assert assign([1.0, 1.0, 1.0], 4) == [0, 1, 2]  # more ranks than items: one each, ties to the lower rank


def test_assign_splits_a_layer_costlier_than_a_ranks_share_when_its_rows_can_be_split():
    # 10 > (10 + 3 + 2) / 2: split, each rank carrying a slice (6), then 3 and 2 packed onto the ranks.
    assert assign([10.0, 3.0, 2.0], 2, [6.0, None, None]) == [SPLIT, 0, 1]
    assert assign([10.0, 3.0, 2.0], 2, [None, None, None]) == [0, 1, 1]  # rows fitted jointly: whole
    assert assign([4.0, 3.0, 2.0], 2, [2.5, 2.0, 1.5]) == [0, 1, 1]  # nothing above the share: whole layers
    assert assign([10.0, 3.0, 2.0], 2, [9.0, None, None]) == [0, 1, 1]  # a slice costs too much to pay
    assert row_slices(91, 2) == [slice(0, 46), slice(46, 91)]
    assert row_slices(2, 3) == [slice(0, 1), slice(1, 2), slice(2, 2)]


def test_reduced_statistics_equal_those_of_all_the_data(tmp_path):
    reports = _run("stats", tmp_path)
    x = torch.randn(96, 12, generator=torch.Generator().manual_seed(0))
    whole, first8 = LayerStats.from_inputs(x), LayerStats.from_inputs(x[:, :8])
    for rank in range(2):
        got = load_file(tmp_path / f"stats{rank}.safetensors")
        # float64 sums of two halves versus one sum: equal up to the summation order.
        torch.testing.assert_close(got["a"], whole.gram, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got["a_abs"], whole.abs_sum, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got["b"], first8.gram, rtol=1e-12, atol=1e-12)  # shared: reduced once, not twice
        assert got["count"].tolist() == [96, 96]
    # One all-reduce of the two unique statistics, Gram matrices as upper triangles: (78 + 12 + 1 + 36 + 8 + 1)
    # float64 values.
    assert reports[0]["bytes_moved"] == 8 * 136


def test_an_error_on_one_rank_is_raised_on_every_rank(tmp_path):
    reports = _run("agree", tmp_path)
    assert reports[1] == {"raised": "ValueError", "message": "bad calibration batch on rank 1"}
    assert reports[0]["raised"] == "RankFailed"
    assert reports[0]["message"] == ("conversion failed on rank 1 of 2, so every rank restored its model: "
                                     "ValueError: bad calibration batch on rank 1")


def test_a_dead_rank_fails_the_others_instead_of_hanging(tmp_path):
    reports = _run("dies", tmp_path)
    assert reports[1] is None
    assert reports[0]["raised"] == "RankFailed"
    assert "another rank probably died or stopped answering" in reports[0]["message"]
    assert reports[0]["seconds"] < 30  # the process group's timeout is 20 s


def test_two_ranks_convert_minilm_like_one_process_on_all_the_data(tmp_path):
    import reparam
    from reparam.minilm import Harness

    reports = _run("convert", tmp_path)
    assert reports[0]["layers"] == reports[1]["layers"] == 36
    assert reports[0]["communicated"] > 0
    ranks = [load_file(tmp_path / f"model{rank}.safetensors") for rank in range(2)]
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])  # identical models on every rank
    assert (tmp_path / "saved0.safetensors").exists() and not (tmp_path / "saved1.safetensors").exists()

    harness = Harness.build(n_calib=64, n_heldout=8)
    single = harness.fresh_model()
    reparam.convert(single, {"encoder.*": {"method": "low_rank", "size_ratio": 0.5}}, calib=harness.calib,
                    progress=False)
    twin = harness.fresh_model()  # the same structure (data-free fit), then the distributed result loaded into it
    reparam.convert(twin, {"encoder.*": {"method": "low_rank", "size_ratio": 0.5}}, progress=False)
    twin.load_state_dict(ranks[0])
    # The statistics were summed in another order (two halves, then the all-reduce): float64 sums
    # that differ in the last bits; the whitened SVD and the cast to float32 keep that below 1e-5.
    for name, module in single.named_modules():
        if isinstance(module, reparam.LowRankLinear):
            torch.testing.assert_close(twin.get_submodule(name).weight, module.weight, rtol=1e-5, atol=1e-5)


def test_a_layer_split_by_rows_equals_the_unsplit_fit_on_every_rank(tmp_path):
    reports = _run("split_rows", tmp_path)
    assert reports[0]["slices"] == [46] and reports[1]["slices"] == [45]  # each rank fitted its slice of the rows
    ranks = [load_file(tmp_path / f"split{rank}.safetensors") for rank in range(2)]
    assert torch.equal(ranks[0]["split"], ranks[1]["split"])
    # The same statistics and each row quantized on its own: only the matrix products' blocking over
    # fewer rows can differ, in the last bits of float64, far below the fp16 parameters' resolution.
    torch.testing.assert_close(ranks[0]["split"], ranks[0]["whole"], rtol=1e-6, atol=1e-6)
    # Errors summed over the slices' rows, as over the whole layer's.
    assert reports[0]["error"] == reports[1]["error"]
    assert abs(reports[0]["error"] - reports[0]["whole_error"]) < 1e-9


def test_an_error_on_one_rank_restores_every_rank(tmp_path):
    reports = _run("convert_fails", tmp_path)
    assert reports[1] == {"raised": "FloatingPointError", "message": "injected failure in the third fit on rank 1",
                          "restored": True}
    assert reports[0]["raised"] == "RankFailed" and reports[0]["restored"]
    assert "FloatingPointError: injected failure in the third fit on rank 1" in reports[0]["message"]
