"""The suite's results: records, the environment they were measured in, and the files written
from them (results.json, RESULTS.md)."""
import json
import os
import platform
import re

import torch

import accumopt


class Results:
    """Records ``{"suite", "case", "impl", "metric", "value", "unit"}`` and notes per suite."""

    def __init__(self, env):
        self.env = env
        self.records = []
        self.notes = {}

    def add(self, suite, case, impl, metric, value, unit):
        self.records.append(dict(suite=suite, case=case, impl=impl, metric=metric,
                                 value=float(value), unit=unit))

    def note(self, suite, text):
        self.notes.setdefault(suite, []).append(text)

    def select(self, suite, metric=None):
        return [r for r in self.records
                if r["suite"] == suite and (metric is None or r["metric"] == metric)]

    def to_json(self):
        return {"env": self.env, "records": self.records, "notes": self.notes}

    def write(self, out_dir, summary_md):
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "results.json"), "w") as f:
            json.dump(self.to_json(), f, indent=1)
        with open(os.path.join(out_dir, "RESULTS.md"), "w") as f:
            f.write(summary_md)


def environment(device, copy_gbps):
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    name = torch.cuda.get_device_name() if device == "cuda" else (platform.processor()
                                                                  or platform.machine())
    return {"device": name if device == "cuda" else f"CPU ({name}, {os.cpu_count()} cores)",
            "torch": torch.__version__, "triton": triton_version,
            "accumopt": accumopt.__version__,
            "cuda": torch.version.cuda if device == "cuda" else None, "copy_GBps": copy_gbps}


def device_slug(env, device):
    if device == "cpu":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", env["device"].lower()).strip("-")


def markdown_table(rows, columns):
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)

