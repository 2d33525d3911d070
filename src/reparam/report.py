"""What ``convert`` changed: per layer and in total, as text, markdown, CSV
or a pandas DataFrame."""
from __future__ import annotations

import csv
import dataclasses
import io
import json


@dataclasses.dataclass(frozen=True)
class LayerReport:
    name: str
    method: str
    params_before: int
    params_after: int
    bytes_before: int
    bytes_after: int
    output_error: float | None = None  # ‖(W − Ŵ)X‖ / ‖WX‖ on calibration inputs
    config: dict | None = None  # the config the layer was converted with, as saved (what "auto" chose)


COLUMNS = [f.name for f in dataclasses.fields(LayerReport)] + ["ratio"]


@dataclasses.dataclass(frozen=True)
class ConversionReport:
    layers: list[LayerReport]
    # Per module type, how many modules the recipe's methods support were left unconverted.
    untouched: dict[str, int] = dataclasses.field(default_factory=dict)
    communicated: int = 0  # bytes the collectives of a distributed conversion moved (per rank)

    @property
    def bytes_before(self) -> int:
        return sum(r.bytes_before for r in self.layers)

    @property
    def bytes_after(self) -> int:
        return sum(r.bytes_after for r in self.layers)

    @property
    def params_before(self) -> int:
        return sum(r.params_before for r in self.layers)

    @property
    def params_after(self) -> int:
        return sum(r.params_after for r in self.layers)

    def to_dict(self) -> dict:
        return {"layers": [dataclasses.asdict(r) for r in self.layers],
                "bytes_before": self.bytes_before, "bytes_after": self.bytes_after,
                "untouched": dict(self.untouched), "communicated": self.communicated}

    def to_markdown(self) -> str:
        """One row per layer, as a markdown table (bytes exact, output error to 4 decimals)."""
        lines = ["| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
        for row in self._rows():
            lines.append("| " + " | ".join(_cell(v) for v in row.values()) + " |")
        return "\n".join(lines)

    def to_csv(self) -> str:
        """One row per layer, with a header row; write it to a file or read it with any CSV tool."""
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: json.dumps(v, sort_keys=True) if isinstance(v, dict) else v for k, v in row.items()}
                         for row in self._rows())
        return out.getvalue()

    def to_dataframe(self):
        """One row per layer as a ``pandas.DataFrame`` (needs pandas)."""
        try:
            import pandas
        except ImportError as err:
            raise ImportError("ConversionReport.to_dataframe needs pandas: pip install pandas "
                              "(to_csv and to_markdown need nothing)") from err
        return pandas.DataFrame(self._rows(), columns=COLUMNS)

    def _rows(self) -> list[dict]:
        return [{**dataclasses.asdict(r), "ratio": r.bytes_after / r.bytes_before if r.bytes_before else None}
                for r in self.layers]

    def __str__(self) -> str:
        width = max([len(r.name) for r in self.layers] + [len("total")])
        head = f"{'layer':<{width}}  {'method':<12} {'params':>17} {'bytes':>21} {'ratio':>6} {'out err':>8}  config"
        lines = [head, "-" * len(head)]
        for r in self.layers:
            lines.append(_row(r.name, r.method, r.params_before, r.params_after,
                              r.bytes_before, r.bytes_after, r.output_error, width) + "  " + _brief(r.config))
        lines.append("-" * len(head))
        errors = [r.output_error for r in self.layers if r.output_error is not None]
        mean_error = sum(errors) / len(errors) if errors else None
        lines.append(_row("total", f"{len(self.layers)} layers", self.params_before, self.params_after,
                          self.bytes_before, self.bytes_after, mean_error, width))
        if self.untouched:
            counts = ", ".join(f"{n} {kind}" for kind, n in sorted(self.untouched.items()))
            lines.append(f"left untouched (supported by the recipe's methods, not selected): {counts}")
        return "\n".join(lines)


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, dict):  # a config: its fields but the method, which has its own column
        return ", ".join(f"{k}={v}" for k, v in value.items() if k != "method")
    return str(value)


def _row(name, method, p0, p1, b0, b1, error, width) -> str:
    ratio = b1 / b0 if b0 else float("nan")
    err = f"{error:8.4f}" if error is not None else f"{'-':>8}"
    return (f"{name:<{width}}  {method:<12} {p0:>8,}→{p1:<8,} {_size(b0):>10}→{_size(b1):<10} "
            f"{ratio:6.3f} {err}")


def _brief(config: dict | None) -> str:
    """The fields that set a layer's size, e.g. ``bits=3 group_size=64``; a composed layer's base in brackets."""
    if not config:
        return ""
    shown = ("bits", "group_size", "size_ratio", "rank", "rank_bits", "rank_ratio", "atoms", "nnz")
    fields = [f"{k}={v}" for k, v in config.items() if k in shown and v is not None]
    if isinstance(config.get("base"), dict):
        fields.insert(0, f"[{config['base']['method']} {_brief(config['base'])}]")
    return " ".join(fields)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    raise AssertionError("unreachable")
