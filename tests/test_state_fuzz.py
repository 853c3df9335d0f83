"""State integrity under random interleavings (hypothesis.stateful): micro-steps with missing
gradients, GradScaler drops and scaled micro-batches, state_dict checkpoints into a fresh
optimizer (also between backward and step() in fold_in_backward mode), deepcopy / pickle /
torch.save of the optimizer, accum_steps and lr changes, and add_param_group — on every
variant, backend and mode, each checked after every operation against an independent float64
reference that moves once per window by the plain formula (torch.optim stepped on the window
gradient Ḡ, or Su's mean-of-squares rule written out). Nothing here uses accumopt's math.

One machine class per (variant, backend, mode, family): the "plain" family (the control) runs
the loop alone; "checkpoint", "deepcopy" and "pickle" (pickle and torch.save) each add one kind
of round trip, so one broken path does not hide another (see FAMILIES at the bottom)."""
import copy
import io
import os
import pickle
from typing import NamedTuple

import torch

# The Triton backend runs in Triton's interpreter on CPU tensors: it must be switched on before
# anything imports triton (conftest.py does the same; this keeps the file runnable on its own).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib.util  # noqa: E402

import pytest  # noqa: E402
from hypothesis import HealthCheck, Phase, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.stateful import (RuleBasedStateMachine, initialize, precondition,  # noqa: E402
                                 rule)

from accumopt import AccumAdam, AccumAdamW, AccumSGDM  # noqa: E402

# set_lr changes lr inside windows on purpose (the reference uses the lr at the update); the
# optimizer's warning about it (meant for schedulers stepped per micro-batch) is expected here.
pytestmark = pytest.mark.filterwarnings("ignore:the lr of param group:UserWarning")

TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON_RUNS = importlib.util.find_spec("triton") is not None and (
    TRITON_DEVICE == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")

INIT_SHAPES = [(3, 2), (5,), (4,)]
ADDED_SHAPES = [(2,), (3, 1)]       # one new parameter per add_param_group, at most two
MAX_PARAMS = len(INIT_SHAPES) + len(ADDED_SHAPES)
INIT_ACCUM_STEPS = 3
# The families' copy methods (see FAMILIES at the bottom).
COPY_FAMILIES = {"deepcopy": ["deepcopy"], "pickle": ["pickle", "torch.save"]}


class Variant(NamedTuple):
    cls: type
    kwargs: dict          # constructor arguments of the accumopt optimizer (lr included)
    ref: str              # "torch": torch.optim on Ḡ; "su": Su's rule written out
    ref_cls: type = None
    ref_kwargs: dict = None


VARIANTS = {
    "SGDM-dampening-wd": Variant(
        AccumSGDM, dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.05), "torch",
        torch.optim.SGD, dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.05)),
    "SGDM-nesterov": Variant(
        AccumSGDM, dict(lr=0.05, momentum=0.9, nesterov=True), "torch",
        torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True)),
    "AdamW-mean_of_squares": Variant(
        AccumAdamW, dict(lr=0.01), "su"),
    "Adam-square_of_mean-amsgrad-wd": Variant(
        AccumAdam, dict(lr=0.01, second_moment="square_of_mean", amsgrad=True,
                        weight_decay=0.05), "torch",
        torch.optim.Adam, dict(lr=0.01, amsgrad=True, weight_decay=0.05)),
}
# AccumAdamW's defaults, which Su's rule below spells out.
SU = dict(betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)
LR_FACTORS = [0.5, 2.0, 0.25, 1.0]


class Batch(NamedTuple):
    """One micro-batch: gradients drawn from ``seed``; parameters (by index) in ``missing`` get
    none; ``assign`` sets ``p.grad`` directly instead of running backward (step mode only)."""
    seed: int
    missing: frozenset
    assign: bool = False


def batches(mode):
    assign = st.booleans() if mode == "step" else st.just(False)
    return st.builds(Batch, st.integers(0, 2 ** 16), st.frozensets(st.integers(0, MAX_PARAMS - 1)),
                     assign)


class Reference:
    """float64 parameters and optimizer state, moved once per window by the plain formula.

    The window's k is read from accum_steps when the window's first good micro-batch comes
    (accum_steps changes take effect at the next window); Ḡ = (sum of the window's gradients)/k,
    a missing gradient counting as zero; a parameter with no gradient in the whole window is
    left untouched (torch.optim skips grad=None; Su's rule skips it too)."""

    def __init__(self, variant, init, lr, accum_steps):
        self.variant = variant
        self.params = [torch.nn.Parameter(t.detach().cpu().double().clone()) for t in init]
        self.group_of = [0] * len(init)
        self.lrs = [lr]
        self.accum_steps = accum_steps
        self.micro = 0              # good micro-batches in the open window
        self.window_k = None
        self.num_updates = 0
        self.updated = False
        self.sums = [None] * len(init)      # Σ_t g_t per parameter (None: no gradient yet)
        self.squares = [None] * len(init)   # Σ_t g_t² per parameter
        if variant.ref == "torch":
            self.opt = variant.ref_cls([{"params": list(self.params)}], foreach=False,
                                       **variant.ref_kwargs)
        else:
            self.m, self.v, self.count = {}, {}, {}

    def add_group(self, init, lr):
        p = torch.nn.Parameter(init.detach().cpu().double().clone())
        self.params.append(p)
        self.group_of.append(len(self.lrs))
        self.lrs.append(lr)
        self.sums.append(None)
        self.squares.append(None)
        if self.variant.ref == "torch":
            self.opt.add_param_group({"params": [p], "lr": lr})

    def set_lr(self, group, lr):
        self.lrs[group] = lr
        if self.variant.ref == "torch":
            self.opt.param_groups[group]["lr"] = lr

    def drop(self):
        """A micro-batch GradScaler drops: nothing changes, nothing is counted."""
        self.updated = False

    def micro_step(self, grads):
        if self.micro == 0:
            self.window_k = self.accum_steps
        for i, g in enumerate(grads):
            if g is None:
                continue
            g = g.detach().cpu().double()
            self.sums[i] = g.clone() if self.sums[i] is None else self.sums[i] + g
            sq = g * g
            self.squares[i] = sq if self.squares[i] is None else self.squares[i] + sq
        self.micro += 1
        self.updated = self.micro == self.window_k
        if self.updated:
            self._update(self.window_k)
            self.micro = 0
            self.num_updates += 1
            self.sums = [None] * len(self.params)
            self.squares = [None] * len(self.params)

    @torch.no_grad()
    def _update(self, k):
        if self.variant.ref == "torch":
            for p, s in zip(self.params, self.sums):
                p.grad = None if s is None else s / k
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            return
        beta1, beta2 = SU["betas"]
        eps, wd = SU["eps"], SU["weight_decay"]
        for i, (p, s, q) in enumerate(zip(self.params, self.sums, self.squares)):
            if s is None:
                continue
            lr = self.lrs[self.group_of[i]]
            mean, mean_sq = s / k, q / k
            m = beta1 * self.m.get(i, torch.zeros_like(p)) + (1 - beta1) * mean
            v = beta2 * self.v.get(i, torch.zeros_like(p)) + (1 - beta2) * mean_sq
            c = self.count.get(i, 0) + 1
            self.m[i], self.v[i], self.count[i] = m, v, c
            p.mul_(1 - lr * wd)
            p.sub_(lr * (m / (1 - beta1 ** c)) / ((v / (1 - beta2 ** c)).sqrt() + eps))

    def state_of(self, i):
        """The reference state of parameter i under torch's key names ({} before any update)."""
        if self.variant.ref == "torch":
            return dict(self.opt.state.get(self.params[i], {}))
        if i not in self.count:
            return {}
        return {"exp_avg": self.m[i], "exp_avg_sq": self.v[i],
                "step": torch.tensor(float(self.count[i]), dtype=torch.float64)}


def _roundtrip_state_dict(state_dict):
    buf = io.BytesIO()
    torch.save(state_dict, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def make_machine(variant_name, backend, mode, family):
    variant = VARIANTS[variant_name]
    fold = mode == "fold_in_backward"
    dtype = torch.float32 if backend == "triton" else torch.float64
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    rtol, atol = (1e-5, 1e-5) if backend == "triton" else (1e-9, 1e-12)
    label = f"{variant_name} backend={backend} mode={mode} family={family}"
    checkpoints = family == "checkpoint"
    copies = COPY_FAMILIES.get(family, [])
    base_lr = variant.kwargs["lr"]

    class Machine(RuleBasedStateMachine):
        """The optimizer under test and its float64 reference, driven rule by rule."""

        # Two or three parameters; two on Triton, whose interpreter pays per tensor.
        @initialize(seed=st.integers(0, 2 ** 16),
                    n_params=st.integers(2, 2 if backend == "triton" else 3))
        def setup(self, seed, n_params):
            gen = torch.Generator().manual_seed(seed)
            init = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype)
                    for s in INIT_SHAPES[:n_params]]
            self.group_options = [{}]   # options each group was constructed / added with
            self.groups = [list(range(n_params))]
            self.params = [torch.nn.Parameter(t.clone().to(device)) for t in init]
            self.opt = self._build(self.params)
            self.ref = Reference(variant, init, base_lr, INIT_ACCUM_STEPS)
            self.t = 0                  # micro-batches run (dropped ones too), for messages
            self.last = "setup"
            self.check()

        # -- helpers ---------------------------------------------------------------------

        def _build(self, params):
            groups = [{"params": [params[i] for i in idx], **opts}
                      for idx, opts in zip(self.groups, self.group_options)]
            return variant.cls(groups, accum_steps=INIT_ACCUM_STEPS, fold_in_backward=fold,
                               backend=backend, **variant.kwargs)

        def _grads(self, batch):
            """The micro-batch's gradients in the parameters' dtype and device (None where
            missing); the reference takes the same values, in float64."""
            gen = torch.Generator().manual_seed(batch.seed)
            grads = []
            for i, p in enumerate(self.params):
                g = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(dtype)
                grads.append(None if i in batch.missing else g.to(device))
            return grads

        def _set_grads(self, grads, assign, scale=None):
            """Put the gradients in place: by a linear loss and backward, or by assignment."""
            if assign:
                for p, g in zip(self.params, grads):
                    p.grad = None if g is None else g.clone()
                return
            terms = [(p * g).sum() for p, g in zip(self.params, grads) if g is not None]
            if terms:
                loss = sum(terms)
                (loss if scale is None else scale(loss)).backward()

        def _check_freed(self):
            if fold:
                for i, p in enumerate(self.params):
                    assert p.grad is None, (
                        f"{label}: micro-step {self.t}: param {i} still holds .grad after "
                        f"backward in fold_in_backward mode (its hook did not fold it)")

        def _fresh_from(self, state_dict, old_opt):
            """A fresh optimizer (same constructor args) on fresh parameter tensors holding the
            current values, loaded from ``state_dict``."""
            if fold:
                old_opt.remove_hooks()
            params = [torch.nn.Parameter(p.detach().clone()) for p in self.params]
            opt = self._build(params)
            opt.load_state_dict(state_dict)
            self.params, self.opt = params, opt

        def _checkpoint(self):
            saved = _roundtrip_state_dict(self.opt.state_dict())
            self._fresh_from(saved, self.opt)

        def check(self, after_step=False):
            where = f"{label}: after {self.last} (micro-step {self.t})"
            assert len(self.params) == len(self.ref.params)
            for i, (p, r) in enumerate(zip(self.params, self.ref.params)):
                got = p.detach().cpu().double()
                torch.testing.assert_close(
                    got, r.detach(), rtol=rtol, atol=atol,
                    msg=lambda m, i=i: f"{where}: param {i} {tuple(r.shape)} differs from the "
                                       f"float64 reference: {m}")
            assert self.opt.num_updates == self.ref.num_updates, (
                f"{where}: num_updates {self.opt.num_updates}, reference "
                f"{self.ref.num_updates}")
            assert self.opt.micro_step == self.ref.micro, (
                f"{where}: micro_step {self.opt.micro_step}, reference {self.ref.micro}")
            if after_step:
                assert self.opt.updated == self.ref.updated, (
                    f"{where}: updated {self.opt.updated}, reference {self.ref.updated}")
            if self.ref.micro == 0:
                # At a window boundary the state is torch.optim's (or Su's m, v, step).
                for i, p in enumerate(self.params):
                    state = self.opt.state.get(p, {})
                    for key, want in self.ref.state_of(i).items():
                        if not torch.is_tensor(want):
                            continue
                        assert key in state, f"{where}: param {i}: state lacks {key!r}"
                        torch.testing.assert_close(
                            torch.as_tensor(state[key]).detach().cpu().double(), want.double(),
                            rtol=rtol, atol=atol,
                            msg=lambda m, i=i, key=key: f"{where}: param {i} state {key!r} "
                                                        f"differs from the reference: {m}")

        # -- rules -----------------------------------------------------------------------

        def _micro_step(self, batch, rule_name):
            """The plain loop: backward (or assign .grad), step(), zero_grad()."""
            self.t += 1
            self.last = f"{rule_name} {batch}"
            grads = self._grads(batch)
            self._set_grads(grads, batch.assign)
            self._check_freed()
            self.opt.step()
            self.opt.zero_grad()
            self.ref.micro_step(grads)
            self.check(after_step=True)

        @rule(batch=batches(mode))
        def micro_step(self, batch):
            """One micro-batch of the plain loop."""
            self._micro_step(batch, "micro_step")

        @rule(micro_batches=st.lists(batches(mode), min_size=2, max_size=5))
        def micro_steps(self, micro_batches):
            """A run of micro-batches of the plain loop (micro-steps outnumber the other
            operations, so windows complete between them)."""
            for batch in micro_batches:
                self._micro_step(batch, "micro_steps")

        @precondition(lambda self: not fold)
        @rule(batch=batches(mode), scale_exp=st.integers(0, 12), bad=st.booleans(),
              real_scaler=st.booleans())
        def scaled_micro_step(self, batch, scale_exp, bad, real_scaler):
            """A GradScaler micro-batch: gradients scaled by s = 2**scale_exp; ``bad`` puts an
            inf in one (GradScaler drops it: nothing changes, not counted). Driven by a real
            torch.amp.GradScaler, or by hand through the ``_step_supports_amp_scaling`` protocol
            (opt.grad_scale / opt.found_inf set around step())."""
            self.t += 1
            self.last = f"scaled_micro_step {batch} s=2**{scale_exp} bad={bad}"
            s = 2.0 ** scale_exp
            grads = self._grads(batch)
            present = [i for i, g in enumerate(grads) if g is not None]
            if not present:   # GradScaler needs a gradient to check
                present = [0]
                grads[0] = self._grads(Batch(batch.seed, frozenset()))[0]
            if real_scaler:
                scaler = torch.amp.GradScaler(device, init_scale=s)
                self._set_grads(grads, False, scale=scaler.scale)
                if bad:
                    self.params[present[0]].grad.view(-1)[0] = float("inf")
                scaler.step(self.opt)
                scaler.update()
            else:
                for p, g in zip(self.params, grads):
                    p.grad = None if g is None else g * s
                if bad:
                    self.params[present[0]].grad.view(-1)[0] = float("inf")
                self.opt.grad_scale = torch.tensor(s, device=device)
                self.opt.found_inf = torch.tensor(1.0 if bad else 0.0, device=device)
                self.opt.step()
                del self.opt.grad_scale
                del self.opt.found_inf
            self.opt.zero_grad()
            if bad:
                self.ref.drop()
            else:
                self.ref.micro_step(grads)
            self.check(after_step=True)

        @precondition(lambda self: checkpoints)
        @rule()
        def checkpoint(self):
            """state_dict -> torch.save -> torch.load(weights_only=True) -> a fresh optimizer
            on fresh parameters -> load_state_dict; carry on with the fresh one."""
            self.last = "checkpoint"
            self._checkpoint()
            self.check()

        @precondition(lambda self: checkpoints and fold)
        @rule(batch=batches(mode))
        def checkpoint_between_backward_and_step(self, batch):
            """fold_in_backward: backward (the hooks fold), then checkpoint into a fresh
            optimizer, then step() the fresh one: the pending folds are in the saved state."""
            self.t += 1
            self.last = f"checkpoint_between_backward_and_step {batch}"
            grads = self._grads(batch)
            self._set_grads(grads, False)
            self._check_freed()
            self._checkpoint()
            self.opt.step()
            self.opt.zero_grad()
            self.ref.micro_step(grads)
            self.check(after_step=True)

        @precondition(lambda self: bool(copies))
        @rule(how=st.sampled_from(copies or ["deepcopy"]))
        def copy_optimizer(self, how):
            """Copy the parameters and the optimizer together and carry on with the copy."""
            self.last = f"copy_optimizer {how}"
            both = (self.params, self.opt)
            if how == "deepcopy":
                params, opt = copy.deepcopy(both)
            elif how == "pickle":
                params, opt = pickle.loads(pickle.dumps(both))
            else:
                buf = io.BytesIO()
                torch.save(both, buf)
                buf.seek(0)
                params, opt = torch.load(buf, weights_only=False)
            self.params, self.opt = list(params), opt
            self.check()

        @rule(k=st.sampled_from([2, 4, 1, 3]))  # 1 makes every micro-step a boundary
        def set_accum_steps(self, k):
            """accum_steps in every group; takes effect at the next window."""
            self.last = f"set_accum_steps {k}"
            for group in self.opt.param_groups:
                group["accum_steps"] = k
            self.ref.accum_steps = k
            self.check()

        @rule(group=st.integers(0, len(ADDED_SHAPES)), factor=st.sampled_from(LR_FACTORS))
        def set_lr(self, group, factor):
            """A group's lr; takes effect at the next update."""
            group %= len(self.opt.param_groups)
            lr = base_lr * factor
            self.last = f"set_lr group {group} = {lr}"
            self.opt.param_groups[group]["lr"] = lr
            self.ref.set_lr(group, lr)
            self.check()

        @precondition(lambda self: self.ref.micro == 0
                      and len(self.groups) <= len(ADDED_SHAPES))
        @rule(seed=st.integers(0, 2 ** 16), factor=st.sampled_from(LR_FACTORS))
        def add_param_group(self, seed, factor):
            """A new group of one new parameter, at a window boundary."""
            shape = ADDED_SHAPES[len(self.groups) - 1]
            init = torch.randn(shape, generator=torch.Generator().manual_seed(seed),
                               dtype=torch.float64).to(dtype)
            lr = base_lr * factor
            self.last = f"add_param_group {shape} lr={lr}"
            p = torch.nn.Parameter(init.clone().to(device))
            options = {"lr": lr, "accum_steps": self.ref.accum_steps}
            self.opt.add_param_group({"params": [p], **options})
            self.params.append(p)
            self.groups.append([len(self.params) - 1])
            self.group_options.append(options)
            self.ref.add_group(init, lr)
            self.check()

    Machine.__name__ = Machine.__qualname__ = (
        f"StateFuzz_{variant_name}_{backend}_{mode}_{family}".replace("-", "_"))
    return Machine


def _settings(examples, steps):
    # One failure per machine (the first found, shrunk): shrinking several is slow, and the
    # families below already keep one kind of round trip per machine.
    # No explain phase: it replays the failing case many times over, slow on Triton.
    return settings(max_examples=examples, stateful_step_count=steps, deadline=None,
                    derandomize=True, database=None, report_multiple_bugs=False,
                    phases=[Phase.explicit, Phase.generate, Phase.shrink],
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


# What each family of machines adds to the plain loop (micro-steps, GradScaler micro-batches in
# step mode, accum_steps / lr changes, add_param_group). "plain" is the control: it checks the
# reference itself on every parametrization, so a failure only in another family points at that
# family's round trip. One round trip per family, so that one broken path does not hide another.
FAMILIES = ["plain", "checkpoint", "deepcopy", "pickle"]
SETTINGS = {
    ("torch", "plain"): _settings(15, 20),
    ("torch", "other"): _settings(15, 20),
    # Triton's interpreter costs ~10 ms per tensor per micro-step: fewer, shorter examples.
    ("triton", "plain"): _settings(5, 12),
    ("triton", "other"): _settings(8, 12),
}

for _variant in VARIANTS:
    for _backend in ("torch", "triton"):
        for _mode in ("step", "fold_in_backward"):
            for _family in FAMILIES:
                _machine = make_machine(_variant, _backend, _mode, _family)
                _case = _machine.TestCase
                _case.settings = SETTINGS[_backend, "plain" if _family == "plain" else "other"]
                if _backend == "triton":
                    _case = pytest.mark.skipif(not TRITON_RUNS,
                                               reason="Triton cannot run here")(_case)
                _name = "Test" + _machine.__name__
                _case.__name__ = _case.__qualname__ = _name
                globals()[_name] = _case
del _variant, _backend, _mode, _family, _machine, _case, _name
