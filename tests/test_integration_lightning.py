"""lightning.Trainer driving accumopt with step_per_window=True: the README's recipe.

Trainer(accumulate_grad_batches=k, gradient_clip_val=None), configure_optimizers returning an
accumopt optimizer with accum_steps=k, fold_in_backward=True, step_per_window=True (optionally
max_grad_norm=c) and a plain LRScheduler with interval="step". Lightning calls
``step(closure)`` with the window's last forward and backward inside the closure (and in a short
window its zero_grad too). The reference is the same Trainer with torch.optim on Lightning's
own .grad accumulation (and, for window clipping, gradient_clip_val=c with
gradient_clip_algorithm="norm"): parameters after every window, the lr of every update, the
clipped norm, and resuming through ModelCheckpoint + ckpt_path at an epoch end, at a window
boundary inside an epoch and inside a window. 7 batches of size 1 with k=3 give windows of 3,
3 and a short 1 (Lightning steps on an epoch's last batch) per epoch.
"""
import warnings

import pytest

pl = pytest.importorskip("lightning.pytorch")

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402


from integration_setup import (CLIP_VARIANTS, EPOCHS, K, LR, N, RTOL64,  # noqa: E402
                               VARIANTS, WINDOWS)
from integration_setup import assert_params_close as _assert_params_close  # noqa: E402

WINDOW_ENDS = [(0, 2), (0, 5), (0, 6), (1, 2), (1, 5), (1, 6)]  # (epoch, batch_idx)

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*GPU available but not used.*"),
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*"),
    pytest.mark.filterwarnings("ignore:.*callbacks used to create the checkpoint.*"),
]


@pytest.fixture(autouse=True)
def _keep_global_rng():
    rng = torch.random.get_rng_state()  # the runs seed the global RNG: give it back
    yield
    torch.random.set_rng_state(rng)


def lr_lambda(update):
    """Linear warmup over 2 updates, then linear decay over the rest: one step per window."""
    return (update + 1) / 2 if update < 2 else max(0.0, (WINDOWS - update) / (WINDOWS - 2))


def accum_kwargs(kwargs, **extra):
    return dict(kwargs, accum_steps=K, fold_in_backward=True, step_per_window=True, **extra)


class Regressor(pl.LightningModule):
    def __init__(self, opt_cls, opt_kwargs):
        super().__init__()
        torch.manual_seed(0)
        self.hidden = nn.Linear(4, 5, dtype=torch.float64)
        self.out = nn.Linear(5, 2, dtype=torch.float64)
        self.opt_cls, self.opt_kwargs = opt_cls, opt_kwargs

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.out(torch.tanh(self.hidden(x))), y)

    def configure_optimizers(self):
        opt = self.opt_cls(self.parameters(), lr=LR, **self.opt_kwargs)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def dataset():
    gen = torch.Generator().manual_seed(1)
    x = 2 * torch.randn(N, 4, generator=gen, dtype=torch.float64)
    y = 3 * torch.randn(N, 2, generator=gen, dtype=torch.float64)
    return TensorDataset(x, y)


class ResumableLoader(DataLoader):
    """A sequential DataLoader Lightning can resume mid-epoch (its _Stateful protocol): it
    reports how many batches of the current pass it has handed out and, after
    load_state_dict, skips them on the next pass. (Lightning does not prefetch from a loader
    with a length, so the count is exactly the batches the loop has taken.)"""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._yielded = 0
        self._skip = 0

    def __iter__(self):
        skip, self._skip = self._skip, 0
        self._yielded = skip
        for i, batch in enumerate(super().__iter__()):
            if i < skip:
                continue
            self._yielded += 1
            yield batch

    def state_dict(self):
        return {"yielded": self._yielded}

    def load_state_dict(self, state_dict):
        self._skip = state_dict["yielded"]


class Recorder(pl.Callback):
    """Per update: the lr it used and the .grad left at on_before_optimizer_step (inside the
    closure, after the window's last backward), the parameters after it and accumopt's window
    norm. ``save_at``: {(epoch, batch_idx): path} for trainer.save_checkpoint at that batch's
    end (what ModelCheckpoint calls), e.g. inside a window."""

    def __init__(self, save_at=None):
        self.params, self.lrs, self.opt_norms, self.grads_left, self.where = [], [], [], [], []
        self.positions = []  # per batch: (epoch, batch_idx, opt.micro_step)
        self.save_at = save_at or {}
        self._last_step = None

    def on_train_start(self, trainer, pl_module):
        self._last_step = trainer.global_step
        self.start_micro_step = getattr(trainer.optimizers[0], "micro_step", None)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.lrs.append([float(g["lr"]) for g in optimizer.param_groups])
        self.grads_left.append([n for n, p in pl_module.named_parameters() if p.grad is not None])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step != self._last_step:
            self._last_step = trainer.global_step
            self.where.append((trainer.current_epoch, batch_idx))
            self.params.append({n: p.detach().clone() for n, p in pl_module.named_parameters()})
            norm = getattr(trainer.optimizers[0], "grad_norm", None)
            self.opt_norms.append(None if norm is None else torch.as_tensor(norm).detach().clone())
        self.positions.append((trainer.current_epoch, batch_idx,
                               getattr(trainer.optimizers[0], "micro_step", None)))
        path = self.save_at.get((trainer.current_epoch, batch_idx))
        if path is not None:
            trainer.save_checkpoint(path)


def fit(opt_cls, opt_kwargs, *, clip=None, callbacks=(), save_at=None, ckpt_path=None,
        resumable=False):
    model = Regressor(opt_cls, opt_kwargs)
    recorder = Recorder(save_at)
    loader_cls = ResumableLoader if resumable else DataLoader
    loader = loader_cls(dataset(), batch_size=1, shuffle=False)
    trainer = pl.Trainer(
        max_epochs=EPOCHS, accumulate_grad_batches=K, gradient_clip_val=clip,
        gradient_clip_algorithm="norm", accelerator="cpu", devices=1, logger=False,
        enable_checkpointing=bool(callbacks), enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, callbacks=[recorder, *callbacks])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        trainer.fit(model, loader, ckpt_path=ckpt_path)
    recorder.trainer = trainer
    recorder.optimizer = trainer.optimizers[0]
    recorder.final = {n: p.detach().clone() for n, p in model.named_parameters()}
    return recorder


def assert_params_close(got, want, what, tol=RTOL64):
    _assert_params_close("Lightning", got, want, what, tol)


def assert_runs_match(mine, ref, label):
    assert mine.where == ref.where == WINDOW_ENDS, (
        f"Lightning, {label}: updates after (epoch, batch) accumopt {mine.where}, "
        f"torch.optim {ref.where}, expected {WINDOW_ENDS}")
    assert all(not left for left in mine.grads_left), (
        f"Lightning, {label}: .grad left at on_before_optimizer_step (fold_in_backward should "
        f"free every gradient): {mine.grads_left}")
    for w, (got, want) in enumerate(zip(mine.params, ref.params)):
        kind = "short" if w % 3 == 2 else "full"
        assert_params_close(got, want, f"{label}, after window {w} ({kind})")
    assert mine.lrs == ref.lrs, (
        f"Lightning, {label}: lr per update differs: accumopt {mine.lrs}, torch.optim "
        f"{ref.lrs}")
    assert_params_close(mine.final, ref.final, f"{label}, final")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_lightning_accumulation_equals_torch_optim_per_window(variant):
    acc_cls, acc_kw, torch_cls, torch_kw = VARIANTS[variant]
    mine = fit(acc_cls, accum_kwargs(acc_kw))
    ref = fit(torch_cls, torch_kw)
    assert_runs_match(mine, ref, variant)
    assert mine.optimizer.num_updates == WINDOWS == mine.trainer.global_step, (
        f"Lightning, {variant}: num_updates {mine.optimizer.num_updates}, global_step "
        f"{mine.trainer.global_step}")
    assert [lrs[0] for lrs in mine.lrs] == pytest.approx(
        [LR * lr_lambda(u) for u in range(WINDOWS)]), mine.lrs
    start = Regressor(acc_cls, acc_kw).state_dict()
    moved = max((mine.final[n] - start[n]).abs().max().item() for n in mine.final)
    assert moved > 1e-3, f"Lightning, {variant}: parameters barely moved ({moved})"


@pytest.mark.parametrize("variant", list(CLIP_VARIANTS))
def test_lightning_window_clipping_equals_gradient_clip_val(variant, monkeypatch):
    acc_cls, acc_kw, torch_cls, torch_kw = CLIP_VARIANTS[variant]
    clip = 2.5
    norms = []
    clip_grad_norm_ = torch.nn.utils.clip_grad_norm_

    def recording_clip(*args, **kwargs):  # Lightning's own clip, unchanged; its norm recorded
        norm = clip_grad_norm_(*args, **kwargs)
        norms.append(norm.detach().clone())
        return norm

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording_clip)
    ref = fit(torch_cls, torch_kw, clip=clip)
    assert len(norms) == WINDOWS, f"Lightning clipped {len(norms)} times"
    values = [float(n) for n in norms]
    assert min(values) < clip < max(values), f"Lightning: choose clip inside {values}"
    mine = fit(acc_cls, accum_kwargs(acc_kw, max_grad_norm=clip))
    assert len(norms) == WINDOWS, "Lightning called clip_grad_norm_ with gradient_clip_val=None"
    for w, (got, want) in enumerate(zip(mine.opt_norms, norms)):
        assert got is not None, "Lightning: accumopt has no opt.grad_norm"
        assert got.dim() == 0, f"Lightning: opt.grad_norm has shape {tuple(got.shape)}"
        torch.testing.assert_close(got.double(), want.double(), rtol=1e-9, atol=1e-12,
                                   msg=lambda m: f"Lightning, {variant}, window {w}: "
                                                 f"opt.grad_norm vs gradient_clip_val's: {m}")
    assert_runs_match(mine, ref, f"{variant} clipped at {clip}")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_lightning_resume_at_an_epoch_end_with_a_plain_dataloader(tmp_path, variant):
    """ModelCheckpoint at each epoch's end (after its short window); a fresh Trainer, model
    and optimizer resume with ckpt_path. A plain DataLoader replays an epoch from its start,
    so an epoch end is where it resumes exactly."""
    acc_cls, acc_kw, torch_cls, torch_kw = VARIANTS[variant]
    every_epoch = pl.callbacks.ModelCheckpoint(
        dirpath=tmp_path, filename="{epoch}", every_n_epochs=1, save_top_k=-1,
        save_on_train_epoch_end=True)
    full = fit(acc_cls, accum_kwargs(acc_kw), callbacks=[every_epoch])
    ref = fit(torch_cls, torch_kw)
    assert_runs_match(full, ref, f"{variant} uninterrupted (checkpointing)")
    path = tmp_path / "epoch=0.ckpt"
    saved = torch.load(path, weights_only=True)
    assert saved["optimizer_states"][0]["state"], "Lightning saved an empty optimizer state"
    resumed = fit(acc_cls, accum_kwargs(acc_kw), ckpt_path=str(path))
    label = f"{variant} resumed from {path.name}"
    assert resumed.where == WINDOW_ENDS[3:], f"Lightning, {label}: updates at {resumed.where}"
    for w, got in enumerate(resumed.params, 3):
        assert_params_close(got, full.params[w], f"{label}, window {w}")
    assert resumed.lrs == full.lrs[3:], (
        f"Lightning, {label}: lr {resumed.lrs} vs uninterrupted {full.lrs[3:]}")
    assert resumed.optimizer.num_updates == WINDOWS, (
        f"Lightning, {label}: num_updates {resumed.optimizer.num_updates}")
    assert_params_close(resumed.final, full.final, f"{label}, final")


# Resuming inside an epoch: (checkpoint name, windows done when it was saved). "step=2" is
# ModelCheckpoint(every_n_train_steps=1) after window 1 (the short window next); the others are
# saved with trainer.save_checkpoint inside a window: after epoch 0's batch 3 (one backward of
# window 1 folded) and after epoch 1's batch 1 (two of window 3 folded).
MID_EPOCH_POINTS = {"step=2": 2, "epoch0-batch3": 1, "epoch1-batch1": 3}
SAVED_AFTER = {"step=2": (0, 5), "epoch0-batch3": (0, 3), "epoch1-batch1": (1, 1)}


def resume_inside_an_epoch(tmp_path, variant, point):
    """A resumable DataLoader (Lightning's state_dict protocol) lets a run resume inside an
    epoch. The uninterrupted run (checkpointing) is checked against torch.optim; returns it,
    the run resumed from ``point`` and the number of windows done before it."""
    acc_cls, acc_kw, torch_cls, torch_kw = VARIANTS[variant]
    every_step = pl.callbacks.ModelCheckpoint(
        dirpath=tmp_path, filename="{step}", every_n_train_steps=1, save_top_k=-1)
    mid = {(0, 3): tmp_path / "epoch0-batch3.ckpt", (1, 1): tmp_path / "epoch1-batch1.ckpt"}
    full = fit(acc_cls, accum_kwargs(acc_kw), callbacks=[every_step], save_at=mid,
               resumable=True)
    ref = fit(torch_cls, torch_kw, resumable=True)
    assert_runs_match(full, ref, f"{variant} uninterrupted (checkpointing)")
    resumed = fit(acc_cls, accum_kwargs(acc_kw), ckpt_path=str(tmp_path / f"{point}.ckpt"),
                  resumable=True)
    return full, resumed, MID_EPOCH_POINTS[point]


@pytest.mark.parametrize("point", list(MID_EPOCH_POINTS))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_lightning_resume_inside_an_epoch_equals_the_uninterrupted_run(tmp_path, variant, point):
    """At a window boundary and inside a window: the fold of the open window lives in the
    optimizer's state_dict, Lightning restores the batch position, the loader the data."""
    full, resumed, done = resume_inside_an_epoch(tmp_path, variant, point)
    label = f"{variant} resumed from {point}.ckpt"
    assert resumed.where == WINDOW_ENDS[done:], (
        f"Lightning, {label}: updates at {resumed.where}, expected {WINDOW_ENDS[done:]}")
    for w, got in enumerate(resumed.params, done):
        assert_params_close(got, full.params[w], f"{label}, window {w}")
    assert resumed.lrs == full.lrs[done:], (
        f"Lightning, {label}: lr {resumed.lrs} vs uninterrupted {full.lrs[done:]}")
    assert resumed.optimizer.num_updates == WINDOWS, (
        f"Lightning, {label}: num_updates {resumed.optimizer.num_updates}")
    assert_params_close(resumed.final, full.final, f"{label}, final")


@pytest.mark.parametrize("point", list(MID_EPOCH_POINTS))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_lightning_resumed_optimizer_knows_its_window_position(tmp_path, variant, point):
    """After resuming, opt.micro_step (the backward passes folded into the open window, what
    the "backward beyond accum_steps" check counts) after every batch equals the
    uninterrupted run's: a state_dict saved between a backward and step(), as every
    checkpoint inside a window is with step_per_window, must carry that backward."""
    full, resumed, _ = resume_inside_an_epoch(tmp_path, variant, point)
    saved = {(e, b): m for e, b, m in full.positions}[SAVED_AFTER[point]]
    assert resumed.start_micro_step == saved, (
        f"Lightning, {variant} resumed from {point}.ckpt: opt.micro_step is "
        f"{resumed.start_micro_step} after loading, {saved} when it was saved")
    tail = full.positions[len(full.positions) - len(resumed.positions):]
    assert resumed.positions == tail, (
        f"Lightning, {variant} resumed from {point}.ckpt: (epoch, batch_idx, opt.micro_step) "
        f"after each batch: resumed {resumed.positions}, uninterrupted {tail}")
