"""Check that a results.json written by ``python -m benchmarks`` is well formed:

    python -m benchmarks.check_results DIR/results.json [SUITE ...]

Exits non-zero, naming the problem, if the env or a record lacks a field, a value is not a
finite number, or a named suite has no records."""
import json
import math
import sys

ENV_KEYS = {"device", "torch", "triton", "accumopt", "cuda", "copy_GBps"}
RECORD_KEYS = {"suite", "case", "impl", "metric", "value", "unit"}


def problems(data, suites):
    found = []
    missing = ENV_KEYS - set(data.get("env", {}))
    if missing:
        found.append(f"env lacks {sorted(missing)}")
    records = data.get("records")
    if not isinstance(records, list) or not records:
        return found + ["no records"]
    for i, record in enumerate(records):
        if set(record) != RECORD_KEYS:
            found.append(f"record {i} has fields {sorted(record)}, not {sorted(RECORD_KEYS)}")
        elif not isinstance(record["value"], (int, float)) or not math.isfinite(record["value"]):
            found.append(f"record {i} ({record['suite']} {record['metric']}) value "
                         f"{record['value']!r} is not a finite number")
    for suite in suites:
        if not any(r.get("suite") == suite for r in records):
            found.append(f"suite {suite!r} has no records")
    return found


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    with open(argv[0]) as f:
        data = json.load(f)
    found = problems(data, argv[1:])
    for problem in found:
        print(f"{argv[0]}: {problem}", file=sys.stderr)
    print(f"{argv[0]}: {len(data.get('records', []))} records, "
          f"{'well formed' if not found else f'{len(found)} problems'}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
