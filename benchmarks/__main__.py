"""accumopt's benchmark suite, the project's main job:

    python -m benchmarks [--quick] [--only SUITE ...] [--out DIR] [--sweep]

Runs on CUDA when there is a GPU, else on the CPU, where it always takes the quick sizes (under
3 minutes on 2 cores). Writes DIR/results.json, DIR/RESULTS.md and PNG plots (default DIR:
benchmarks/results/<device-slug>) and prints the summary tables.
"""
import argparse
import os
import sys

import torch

from benchmarks import (suite_convergence, suite_host, suite_kernels, suite_sharded, suite_step,
                        suite_train)
from benchmarks.plots import make_plots
from benchmarks.progress import Progress
from benchmarks.report import Results, device_slug, environment, markdown_table
from benchmarks.timing import copy_gbps

SUITES = {"kernels": suite_kernels, "step": suite_step, "train": suite_train,
          "convergence": suite_convergence, "sharded": suite_sharded, "host": suite_host}
COLUMNS = {
    "kernels": ["fold_GBps", "fold_of_copy", "update_GBps", "update_of_copy"],
    "step": ["fold_wall_ms", "update_wall_ms", "window_wall_ms", "fold_launches",
             "update_launches", "window_launches"],
    "train": ["peak_memory", "fp32_grad_bytes_saved", "tokens_per_s", "throughput_vs_standard",
              "backward_ms", "loss_after_4_windows", "loss_after_2_windows"],
    "convergence": ["final_train_loss", "final_val_loss"],
    "host": ["fold_us", "update_us", "hooks_and_step_us", "first_hook_us", "large_hook_us",
             "small_hook_us", "bare_hook_us", "hook_step_us", "zero_grad_us", "step_us", "python_us",
             "of_adamw_python", "of_step_mode", "loop_of_step_mode", "tables_ms"],
    "sharded": ["carried_MiB", "peak_over_start_MiB", "params_state_MiB", "boundary_extra_MiB",
                "comm_MiB"],
}


def _format(record):
    value, unit = record["value"], record["unit"]
    if unit == "fraction":
        return f"{value:.0%}"
    if unit in ("kernels",):
        return f"{value:.0f}"
    if unit == "nats":
        return f"{value:.4f}"
    return f"{value:.3g}" if value < 100 else f"{value:,.0f}"


def summarize(results, suites, plots):
    env = results.env
    lines = [f"# accumopt benchmarks on {env['device']}", "",
             f"torch {env['torch']}, triton {env['triton']}, accumopt {env['accumopt']}, "
             f"CUDA {env['cuda']}; device-to-device copy {env['copy_GBps']:.0f} GB/s.", "",
             "Written by `python -m benchmarks` (benchmarks/__main__.py); every number below "
             "comes from that run.", ""]
    for suite in suites:
        module = SUITES[suite]
        rows = {}
        for r in results.select(suite):
            if r["metric"] in COLUMNS[suite]:
                row = rows.setdefault((r["case"], r["impl"]), {"case": r["case"],
                                                               "impl": r["impl"]})
                row[f"{r['metric']} ({r['unit']})"] = _format(r)
        columns = ["case", "impl"] + [c for c in dict.fromkeys(
            k for row in rows.values() for k in row) if c not in ("case", "impl")]
        lines += [f"## {suite}", "", module.__doc__.strip().split("\n\n")[0], ""]
        lines += [f"- {note}" for note in results.notes.get(suite, [])]
        lines += ["", markdown_table(list(rows.values()), columns), ""]
        if f"{suite}.png" in plots:
            lines += [f"![{suite}]({suite}.png)", ""]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (always on the CPU)")
    parser.add_argument("--only", nargs="+", choices=list(SUITES), metavar="SUITE",
                        help=f"run only these suites ({', '.join(SUITES)})")
    parser.add_argument("--out", help="output folder (default benchmarks/results/<device>)")
    parser.add_argument("--sweep", action="store_true",
                        help="also time the kernels' block size x warps per dtype (GPU only)")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    quick = args.quick or device == "cpu"
    suites = args.only or list(SUITES)
    env = environment(device, copy_gbps(device, 2 ** 26 if device == "cuda" else 2 ** 20))
    results = Results(env)
    progress = Progress(sum(SUITES[s].work(device, quick) for s in suites)
                        + (suite_kernels.sweep_work(device) if args.sweep else 0))
    for suite in suites:
        SUITES[suite].run(device, quick, results, progress)
    if args.sweep:
        if "kernels" not in suites:
            suites = suites + ["kernels"]
        suite_kernels.sweep(device, results, progress)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   device_slug(env, device))
    plots = make_plots(results, out)
    summary = summarize(results, suites, plots)
    results.write(out, summary)
    print(summary)
    print(f"\nwritten to {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
