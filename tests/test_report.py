"""The conversion report: text, markdown, CSV, DataFrame; and the log it leaves."""
import csv
import io
import logging

import pytest
import torch
from torch import nn

import reparam


def _report():
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    calib = [torch.randn(32, 16)]
    return reparam.convert(model, {"0": {"method": "low_rank", "rank": 2}, "2": {"method": "affine", "bits": 4,
                                                                              "group_size": 32}},
                           calib=calib, progress=False)


def test_csv_and_markdown_hold_every_layer_exactly():
    report = _report()
    rows = list(csv.DictReader(io.StringIO(report.to_csv())))
    assert [r["name"] for r in rows] == ["0", "2"]
    assert [int(r["bytes_after"]) for r in rows] == [r.bytes_after for r in report.layers]
    assert float(rows[0]["ratio"]) == pytest.approx(report.layers[0].bytes_after / report.layers[0].bytes_before)
    markdown = report.to_markdown().splitlines()
    assert markdown[0] == "| name | method | params_before | params_after | bytes_before | bytes_after | " \
                          "output_error | config | ratio |"
    assert len(markdown) == 2 + len(report.layers)
    assert markdown[2].startswith(f"| 0 | low_rank | 136 | {report.layers[0].params_after} | 544 |")


def test_dataframe_matches_the_layers():
    pandas = pytest.importorskip("pandas")
    frame = _report().to_dataframe()
    assert isinstance(frame, pandas.DataFrame)
    assert list(frame["name"]) == ["0", "2"] and frame["bytes_after"].sum() == _report().bytes_after


def test_convert_logs_through_the_standard_logging_module(caplog):
    with caplog.at_level(logging.INFO, logger="reparam"):
        _report()
    assert "converting 2 modules (affine, low_rank)" in caplog.text
