"""LR schedulers driven per parameter update, not per micro-batch.

In per-micro-batch mode a training loop calls ``step()`` once per micro-batch, so a scheduler
stepped beside it would run ``accum_steps`` times too fast. :func:`per_update` wraps it so that
its ``step()`` acts only after an optimizer step that moved the parameters."""
import warnings

from torch.optim.lr_scheduler import LRScheduler


def _accum_optimizer(optimizer):
    """The accumopt optimizer behind framework wrappers (Accelerate's AcceleratedOptimizer,
    Lightning's LightningOptimizer keep it as ``.optimizer``)."""
    seen = set()
    while not hasattr(optimizer, "updated") and hasattr(optimizer, "optimizer") and \
            id(optimizer) not in seen:
        seen.add(id(optimizer))
        optimizer = optimizer.optimizer
    return optimizer


class PerUpdate(LRScheduler):
    """A scheduler that steps only when its optimizer's last ``step()`` moved the parameters.
    It is an LRScheduler (frameworks check that), and everything else — ``state_dict``,
    ``load_state_dict``, ``get_last_lr``, ``last_epoch`` — is the wrapped scheduler's."""

    def __init__(self, scheduler):  # LRScheduler.__init__ would reset the learning rates
        self.scheduler = scheduler
        self.optimizer = scheduler.optimizer

    def step(self, *args, **kwargs):
        optimizer = _accum_optimizer(self.scheduler.optimizer)
        if getattr(optimizer, "updated", True):
            with warnings.catch_warnings():
                # torch's "step() before optimizer.step()" check counts micro-steps, not updates
                warnings.filterwarnings("ignore", message=".*lr_scheduler.step.*")
                self.scheduler.step(*args, **kwargs)

    def state_dict(self):
        return self.scheduler.state_dict()

    def load_state_dict(self, state_dict):
        self.scheduler.load_state_dict(state_dict)

    def get_last_lr(self):
        return self.scheduler.get_last_lr()

    def get_lr(self):
        return self.scheduler.get_lr()

    def __getattr__(self, name):
        if name == "scheduler":  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.scheduler, name)

    def __repr__(self):
        return f"per_update({self.scheduler!r})"


def per_update(scheduler):
    """Wrap ``scheduler`` so that its ``step()`` steps it only when the optimizer's last
    ``step()`` moved the parameters (``opt.updated``); for an optimizer without ``updated`` (a
    torch.optim one) it steps every time."""
    return PerUpdate(scheduler)
