"""torch-optimi (``pip install torch-optimi``), the closest competitor: its optimizer
accumulation with gradient release, driven as its documentation describes. Every suite skips its
rows, with a note, where it is not installed."""


def optimi():
    try:
        import optimi
        return optimi
    except ImportError:
        return None


MISSING = "torch-optimi is not installed here: its rows are skipped"


def guarded(is_peer, results, suite, progress, label, fn):
    """``fn()``; if it fails for the peer, a note replaces its rows (returns None). A failure of
    accumopt's own rows, or torch's, is raised."""
    try:
        return fn()
    except Exception as err:
        if not is_peer:
            raise
        results.note(suite, f"torch-optimi failed ({type(err).__name__}: {err}); "
                            f"its rows are skipped")
        progress.advance(f"{suite}: {label} (failed)")
        return None


class OptimiAccumulation:
    """optimi.AdamW(gradient_release=True) with ``optimizer_accumulation`` set on every
    micro-step but each window's last: the hooks fold each micro-batch gradient into the moments
    (an EMA step per micro-batch, optimi's approximation) and step on the last."""

    def __init__(self, model_or_params, accum_steps, lr, weight_decay=1e-2, triton=False):
        lib = optimi()
        params = (list(model_or_params.parameters()) if hasattr(model_or_params, "parameters")
                  else list(model_or_params))
        self.opt = lib.AdamW(params, lr=lr, weight_decay=weight_decay, gradient_release=True,
                             triton=triton)
        self.params, self.k, self.i = params, accum_steps, 0
        if hasattr(model_or_params, "parameters"):
            lib.prepare_for_gradient_release(model_or_params, self.opt)
            self.model = model_or_params

    def before_backward(self):
        """Set before each micro-batch's backward, whose hooks fold (and free) its gradients."""
        self.opt.optimizer_accumulation = (self.i + 1) % self.k != 0
        self.i += 1

    def step_without_backward(self):
        """One micro-step on gradients already in ``.grad`` (the kernel suites have no
        backward): what the hooks would do, parameter by parameter, keeping the gradients."""
        self.before_backward()
        for p in self.params:
            self.opt.step(param=p)

    def remove(self):
        if hasattr(self, "model"):
            optimi().remove_gradient_release(self.model)
