"""HF transformers.Trainer driving accumopt with step_per_window=True: the README's recipe.

The Trainer keeps its own gradient accumulation (gradient_accumulation_steps=k) and its own LR
scheduler, its clipping is off (max_grad_norm=0), and it is given an accumopt optimizer with
accum_steps=k, fold_in_backward=True, step_per_window=True (optionally max_grad_norm=c). Every
test compares against the same Trainer run with torch.optim on the Trainer's own .grad
accumulation (and, for window clipping, the Trainer's own clipping at c): parameters after
every window, the lr of every update, the clipped norm, checkpoint/resume, and token-weighted
losses. 7 micro-batches of batch size 1 with k=3 give windows of 3, 3 and a short 1 per epoch.
"""
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # the Trainer runs on it

import torch  # noqa: E402
from torch import nn  # noqa: E402

from accumopt import AccumAdamW, AccumSGDM  # noqa: E402

# conftest.py keeps the repository's kernels/ folder from posing as the `kernels` package that
# transformers probes for.
transformers.logging.set_verbosity_error()

from integration_setup import CLIP_VARIANTS, EPOCHS, K, LR, N, RTOL64  # noqa: E402
from integration_setup import assert_params_close as _assert_params_close  # noqa: E402

# (accumopt class, its kwargs, torch.optim class, its kwargs); both get the same lr (and, where
# the Trainer builds the optimizer, its two param groups: decay / no decay).
HF_VARIANTS = {
    "SGDM": (AccumSGDM, dict(momentum=0.9), torch.optim.SGD, dict(momentum=0.9)),
    "AdamW": (AccumAdamW, dict(second_moment="square_of_mean", betas=(0.9, 0.99)),
              torch.optim.AdamW, dict(betas=(0.9, 0.99))),
}


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """The Trainer builds an Accelerator; its process-wide shared state must not leak
    between runs (a later Accelerator would inherit the earlier one's settings)."""
    from accelerate.state import AcceleratorState, GradientState
    rng = torch.random.get_rng_state()  # the Trainer reseeds the global RNG: give it back
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    torch.random.set_rng_state(rng)


class Regressor(nn.Module):
    """A float64 regressor in the Trainer's model convention (returns {"loss": ...}). No
    **kwargs in forward, so the Trainer divides each loss by the window's micro-batch count."""

    def __init__(self):
        super().__init__()
        self.hidden = nn.Linear(4, 5, dtype=torch.float64)
        self.out = nn.Linear(5, 2, dtype=torch.float64)

    def forward(self, x, labels):
        return {"loss": nn.functional.mse_loss(self.out(torch.tanh(self.hidden(x))), labels)}


def regression_data(n=N):
    gen = torch.Generator().manual_seed(1)
    return [{"x": 2 * torch.randn(4, generator=gen, dtype=torch.float64),
             "labels": 3 * torch.randn(2, generator=gen, dtype=torch.float64)}
            for _ in range(n)]


def gpt2_model():
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50,
                                     n_positions=16)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).double()


def gpt2_data(n=N):
    """Token ids with a different number of -100 (ignored) labels per sample, so the Trainer's
    num_items_in_batch differs between windows and micro-batches weigh differently."""
    gen = torch.Generator().manual_seed(2)
    data = []
    for i in range(n):
        ids = torch.randint(0, 50, (10,), generator=gen)
        labels = ids.clone()
        labels[: (3 * i) % 7] = -100
        data.append({"input_ids": ids, "labels": labels})
    return data


class Recorder(transformers.TrainerCallback):
    """At every optimizer step (after step(), before the scheduler steps): the parameters, the
    lr that update used, and for accumopt its window norm; checks that accumopt's hooks left
    no .grad behind (the folds really happened in backward)."""

    def __init__(self):
        self.params, self.lrs, self.opt_norms, self.grads_left = [], [], [], []
        self.optimizer = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads_left.append([n for n, p in model.named_parameters() if p.grad is not None])

    def on_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        inner = getattr(optimizer, "optimizer", optimizer)  # the Trainer's AcceleratedOptimizer
        self.optimizer = inner
        self.params.append({n: p.detach().clone() for n, p in model.named_parameters()})
        self.lrs.append([float(g["lr"]) for g in inner.param_groups])
        norm = getattr(inner, "grad_norm", None)
        self.opt_norms.append(None if norm is None else torch.as_tensor(norm).detach().clone())


class NormRecordingTrainer(transformers.Trainer):
    """The Trainer's own clipping, unchanged; only the norm it returns is recorded."""

    clip_norms = None

    def _clip_grad_norm(self, model):
        norm = super()._clip_grad_norm(model)
        self.clip_norms.append(torch.as_tensor(norm).detach().clone())
        return norm


def run_trainer(out_dir, opt_cls, opt_kwargs, *, clip=0.0, model_fn=None, data=None,
                resume=None, save_steps=None, sampling="random", pass_as="tuple"):
    """One Trainer run. ``pass_as="tuple"``: the README's recipe, ``optimizers=(opt, sched)``
    with transformers' linear warmup schedule; ``"cls_and_kwargs"``: the Trainer builds the
    optimizer (its decay / no-decay param groups) and its own linear scheduler."""
    model = (model_fn or _regressor)()
    args = transformers.TrainingArguments(
        output_dir=str(out_dir), per_device_train_batch_size=1,
        gradient_accumulation_steps=K, num_train_epochs=EPOCHS, learning_rate=LR,
        weight_decay=0.1, lr_scheduler_type="linear", warmup_steps=2, max_grad_norm=clip,
        seed=0, data_seed=0, train_sampling_strategy=sampling, report_to=[],
        disable_tqdm=True, logging_strategy="no", use_cpu=True, dataloader_num_workers=0,
        remove_unused_columns=False, save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500, save_only_model=False)
    recorder = Recorder()
    if pass_as == "tuple":
        opt = opt_cls(model.parameters(), lr=LR, **opt_kwargs)
        sched = transformers.get_linear_schedule_with_warmup(opt, 2, EPOCHS * 3)
        how = dict(optimizers=(opt, sched))
    else:
        how = dict(optimizer_cls_and_kwargs=(opt_cls, {"lr": LR, **opt_kwargs}))
    trainer = NormRecordingTrainer(
        model=model, args=args, train_dataset=data if data is not None else regression_data(),
        callbacks=[recorder], **how)
    trainer.remove_callback(transformers.trainer_callback.PrinterCallback)
    trainer.clip_norms = []
    trainer.train(resume_from_checkpoint=resume)
    recorder.trainer = trainer
    recorder.final = {n: p.detach().clone() for n, p in model.named_parameters()}
    return recorder


def _regressor():
    torch.manual_seed(0)
    return Regressor()


def accum_kwargs(kwargs, **extra):
    return dict(kwargs, accum_steps=K, fold_in_backward=True, step_per_window=True, **extra)


def assert_params_close(got, want, what, tol=RTOL64):
    _assert_params_close("HF Trainer", got, want, what, tol)


def assert_runs_match(mine, ref, label, tol=RTOL64):
    windows = EPOCHS * 3
    assert len(mine.params) == len(ref.params) == windows, (
        f"HF Trainer, {label}: {len(mine.params)} accumopt updates, {len(ref.params)} "
        f"torch.optim updates, expected {windows} (windows 3, 3, 1 per epoch)")
    assert mine.optimizer.num_updates == windows, (
        f"HF Trainer, {label}: accumopt counted {mine.optimizer.num_updates} updates")
    assert all(not left for left in mine.grads_left), (
        f"HF Trainer, {label}: .grad left behind at the optimizer step (fold_in_backward "
        f"should free every gradient): {mine.grads_left}")
    for w, (got, want) in enumerate(zip(mine.params, ref.params)):
        kind = "short" if w % 3 == 2 else "full"
        assert_params_close(got, want, f"{label}, after window {w} ({kind})", tol)
    assert mine.lrs == ref.lrs, (
        f"HF Trainer, {label}: lr per update differs: accumopt {mine.lrs}, torch.optim "
        f"{ref.lrs}")
    assert_params_close(mine.final, ref.final, f"{label}, final", tol)


@pytest.mark.parametrize("pass_as", ["tuple", "cls_and_kwargs"])
@pytest.mark.parametrize("variant", list(HF_VARIANTS))
def test_trainer_accumulation_equals_torch_optim_per_window(tmp_path, variant, pass_as):
    acc_cls, acc_kw, torch_cls, torch_kw = HF_VARIANTS[variant]
    mine = run_trainer(tmp_path / "accumopt", acc_cls, accum_kwargs(acc_kw), pass_as=pass_as)
    ref = run_trainer(tmp_path / "torch", torch_cls, torch_kw, pass_as=pass_as)
    assert_runs_match(mine, ref, f"{variant}, optimizer passed as {pass_as}")
    groups = 1 if pass_as == "tuple" else 2  # the Trainer's decay / no-decay groups
    assert len(mine.optimizer.param_groups) == groups, mine.optimizer.param_groups
    # The Trainer's linear warmup (2 steps: lr 0, lr/2) then decay, one step per window.
    assert [lrs[0] for lrs in mine.lrs[:3]] == pytest.approx([0.0, LR / 2, LR]), mine.lrs
    assert mine.lrs[-1][0] < mine.lrs[3][0] < LR, mine.lrs
    # A sanity check that the comparison can fail: training moved the parameters.
    start = _regressor().state_dict()
    moved = max((mine.final[n] - start[n]).abs().max().item() for n in start)
    assert moved > 1e-3, f"HF Trainer, {variant}: parameters barely moved ({moved})"


@pytest.mark.parametrize("variant", list(CLIP_VARIANTS))
def test_trainer_window_clipping_equals_the_trainers_clipping(tmp_path, variant):
    acc_cls, acc_kw, torch_cls, torch_kw = CLIP_VARIANTS[variant]
    clip = 5.0
    ref = run_trainer(tmp_path / "torch", torch_cls, torch_kw, clip=clip)
    norms = [float(n) for n in ref.trainer.clip_norms]
    assert len(norms) == EPOCHS * 3
    # The threshold clips some windows and not others.
    assert min(norms) < clip < max(norms), f"HF Trainer: choose clip inside {norms}"
    mine = run_trainer(tmp_path / "accumopt", acc_cls, accum_kwargs(acc_kw, max_grad_norm=clip))
    for w, (got, want) in enumerate(zip(mine.opt_norms, ref.trainer.clip_norms)):
        assert got is not None, "HF Trainer: accumopt has no opt.grad_norm"
        assert got.dim() == 0, f"HF Trainer: opt.grad_norm has shape {tuple(got.shape)}"
        torch.testing.assert_close(got.double(), want.double(), rtol=1e-9, atol=1e-12,
                                   msg=lambda m: f"HF Trainer, {variant}, window {w}: "
                                                 f"opt.grad_norm vs the Trainer's clip: {m}")
    assert_runs_match(mine, ref, f"{variant} clipped at {clip}")


def test_trainer_resume_from_its_checkpoints_equals_the_uninterrupted_run(tmp_path):
    """The Trainer saves only at window boundaries (after global_step increments): resume
    from one inside the first epoch and one inside the second (its short window behind it)."""
    acc_cls, acc_kw, torch_cls, torch_kw = HF_VARIANTS["AdamW"]
    full = run_trainer(tmp_path / "full", acc_cls, accum_kwargs(acc_kw), save_steps=1)
    ref = run_trainer(tmp_path / "torch", torch_cls, torch_kw)
    assert_params_close(full.final, ref.final, "uninterrupted accumopt vs torch.optim")
    saved = torch.load(tmp_path / "full" / "checkpoint-2" / "optimizer.pt", weights_only=True)
    assert saved["state"], "HF Trainer saved an empty optimizer state"
    for step in (2, 4):
        checkpoint = str(tmp_path / "full" / f"checkpoint-{step}")
        resumed = run_trainer(tmp_path / f"resumed{step}", acc_cls, accum_kwargs(acc_kw),
                              resume=checkpoint)
        assert len(resumed.params) == EPOCHS * 3 - step, (
            f"HF Trainer: resumed from checkpoint-{step} ran {len(resumed.params)} updates")
        for w, got in enumerate(resumed.params):
            assert_params_close(got, full.params[step + w],
                                f"resumed from checkpoint-{step}, window {step + w}")
        assert resumed.lrs == full.lrs[step:], (
            f"HF Trainer: lr after resuming from checkpoint-{step}: {resumed.lrs} vs "
            f"{full.lrs[step:]}")
        assert resumed.optimizer.num_updates == EPOCHS * 3, (
            f"HF Trainer: num_updates {resumed.optimizer.num_updates} after resuming")
        assert_params_close(resumed.final, full.final, f"resumed from checkpoint-{step}, final")


def test_trainer_token_weighted_loss_with_padded_labels_gpt2(tmp_path):
    """A causal LM accepts loss kwargs: the Trainer passes num_items_in_batch (the window's
    count of labels != -100) and does not divide the loss; accumopt must add the gradients
    as they come, short window included."""
    acc_cls, acc_kw, torch_cls, torch_kw = HF_VARIANTS["AdamW"]
    data = gpt2_data()
    mine = run_trainer(tmp_path / "accumopt", acc_cls, accum_kwargs(acc_kw), model_fn=gpt2_model,
                       data=data, pass_as="cls_and_kwargs")
    assert mine.trainer.model_accepts_loss_kwargs, "GPT-2 should take num_items_in_batch"
    ref = run_trainer(tmp_path / "torch", torch_cls, torch_kw, model_fn=gpt2_model, data=data,
                      pass_as="cls_and_kwargs")
    assert_runs_match(mine, ref, "GPT-2 token-weighted AdamW")
