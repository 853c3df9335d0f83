"""PNG plots of the suites' results (matplotlib, headless)."""
import os


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        return None


def make_plots(results, out_dir):
    """Write a PNG per suite that ran; return their file names (none without matplotlib)."""
    plt = _pyplot()
    if plt is None:
        for suite in {r["suite"] for r in results.records}:
            results.note(suite, "matplotlib is not installed: no plots")
        return []
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for suite, draw in (("kernels", _kernels), ("train", _train),
                        ("convergence", _convergence)):
        if results.select(suite):
            fig = draw(plt, results)
            name = f"{suite}.png"
            fig.savefig(os.path.join(out_dir, name), dpi=110, bbox_inches="tight")
            plt.close(fig)
            written.append(name)
    return written


def _kernels(plt, results):
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, what in zip(axes, ("fold", "update")):
        by_impl = {}
        for r in results.select("kernels", f"{what}_of_copy"):
            if r["case"].startswith("2^"):
                by_impl.setdefault(r["impl"], []).append((int(r["case"][2:]), r["value"]))
        for impl, points in sorted(by_impl.items()):
            xs, ys = zip(*sorted(points))
            ax.plot(xs, ys, marker="o", label=impl)
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_title(f"{what} micro-step")
        ax.set_xlabel("log2(elements)")
    axes[0].set_ylabel("bandwidth / device copy bandwidth")
    axes[1].legend(fontsize=7)
    fig.suptitle(f"kernels on {results.env['device']}")
    return fig


def _train(plt, results):
    metrics = [m for m in ("peak_memory", "tokens_per_s")
               if results.select("train", m)]
    fig, axes = plt.subplots(1, len(metrics), figsize=(6 * len(metrics), 4.5), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        rows = results.select("train", metric)
        ax.barh([r["impl"] for r in rows], [r["value"] for r in rows])
        ax.set_xlabel(f"{metric} ({rows[0]['unit']})")
        ax.invert_yaxis()
    fig.suptitle(f"training with accumulation on {results.env['device']}")
    return fig


def _convergence(plt, results):
    fig, ax = plt.subplots(figsize=(8, 5))
    curves = {}
    for r in results.select("convergence", "train_loss"):
        curves.setdefault(r["impl"], []).append((int(r["case"].split()[1]), r["value"]))
    for impl, points in curves.items():
        xs, ys = zip(*sorted(points))
        ax.plot(xs, ys, label=impl)
    ax.set_xlabel("window (same tokens for every method)")
    ax.set_ylabel("mean training loss over the window (nats/byte)")
    ax.set_title("byte-level LM on the Python standard library")
    ax.legend(fontsize=8)
    return fig
