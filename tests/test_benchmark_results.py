"""The benchmark suite's results.json contract (checked by .ci/run on a real quick run):
benchmarks.check_results accepts what benchmarks.report writes and rejects what breaks it."""
import json
import math

from benchmarks.check_results import problems
from benchmarks.report import Results


def written(tmp_path, results):
    results.write(str(tmp_path), "# summary\n")
    with open(tmp_path / "results.json") as f:
        return json.load(f)


def sample():
    results = Results({"device": "CPU", "torch": "2", "triton": None, "accumopt": "0.1",
                       "cuda": None, "copy_GBps": 10.0})
    results.add("kernels", "2^16", "accumopt torch (adamw)", "fold_GBps", 12.5, "GB/s")
    return results


def test_what_the_report_writes_is_well_formed(tmp_path):
    assert problems(written(tmp_path, sample()), ["kernels"]) == []
    assert (tmp_path / "RESULTS.md").read_text() == "# summary\n"


def test_missing_env_field_bad_value_and_missing_suite_are_reported(tmp_path):
    data = written(tmp_path, sample())
    del data["env"]["copy_GBps"]
    data["records"][0]["value"] = math.inf
    data["records"].append({"suite": "step", "case": "x", "impl": "y", "metric": "z"})
    found = problems(data, ["kernels", "train"])
    assert any("copy_GBps" in p for p in found), found
    assert any("finite" in p for p in found), found
    assert any("record 1 has fields" in p for p in found), found
    assert any("'train' has no records" in p for p in found), found
