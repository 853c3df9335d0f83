"""fold_in_backward's hooks: a post-accumulate-grad hook on every parameter of such a group
hands its gradient to the optimizer the moment autograd has finished it.

A parameter has at most one live fold_in_backward optimizer: a second one on a parameter the first
still hooks would split its micro-batches between them, so claiming it is an error until the
first calls ``remove_hooks()`` or is dropped. The hooks hold the optimizer weakly, and a dropped
optimizer's hooks are removed when it is collected (:func:`release_on_collect`), so dropped
optimizers neither keep their hooks nor slow backward down."""
import functools
import gc
import weakref

from torch.utils.weak import WeakIdKeyDictionary

# parameter -> weak reference to the optimizer whose hooks fold it
_owners = WeakIdKeyDictionary()


class HookRoute:
    """What one parameter's hook holds: its optimizer, weakly, and the short way the optimizer
    sets once it has found the parameter's Triton bucket in a micro-step: ``take(t, param)``,
    that bucket's DeviceWindow.take_hooked for tensor ``t`` there (which marks the tensor taken
    in the bucket's row). ``take`` is None until then and after the optimizer drops its windows
    (a load)."""
    __slots__ = ("optimizer_ref", "take", "t")

    def __init__(self, optimizer_ref):
        self.optimizer_ref = optimizer_ref
        self.take, self.t = None, -1


def _fold_hook(route, param):
    # Once per parameter per backward: the short way first, with no call through the optimizer.
    take = route.take
    if take is not None and take(route.t, param):
        return
    optimizer = route.optimizer_ref()
    if optimizer is not None:
        optimizer._fold_in_backward(param)


def _live_owner(param):
    ref = _owners.get(param)
    return None if ref is None else ref()


def check_unclaimed(optimizer, params, group_index):
    """Raise ValueError naming fold_in_backward if another live optimizer hooks any of
    ``params``; changes nothing."""
    def others():
        return [p for p in params if _live_owner(p) not in (None, optimizer)]

    taken = others()
    if taken:
        gc.collect()  # an owner kept alive only by a reference cycle is not live
        taken = others()
    if taken:
        owner = _live_owner(taken[0])
        raise ValueError(
            f"Invalid fold_in_backward: {len(taken)} parameter(s) of param group {group_index} "
            f"are already folded by the hooks of a live fold_in_backward optimizer "
            f"({type(owner).__name__} at {id(owner):#x}); two optimizers cannot both fold a "
            f"parameter's gradients. Call remove_hooks() on the old optimizer (or delete it) "
            f"before building the new one")


def register_fold_hooks(optimizer, params, routes):
    """Claim ``params`` for ``optimizer`` and register the hook on each that requires grad;
    return the handles. Each hook's HookRoute goes into ``routes`` (id(param) -> route). Call
    :func:`check_unclaimed` first."""
    ref = weakref.ref(optimizer)
    handles = []
    for p in params:
        if p.requires_grad:
            _owners[p] = ref
            route = routes[id(p)] = HookRoute(ref)
            handles.append(p.register_post_accumulate_grad_hook(
                functools.partial(_fold_hook, route)))
    return handles


def release(optimizer, params, handles):
    """Remove ``handles`` and give up the claim on ``params`` (those this optimizer holds)."""
    _remove_handles(handles)
    for p in params:
        if _live_owner(p) is optimizer:
            del _owners[p]


def _remove_handles(handles):
    for handle in handles:
        handle.remove()
    handles.clear()


def release_on_collect(optimizer, handles):
    """Remove the hooks in the (shared, mutable) list ``handles`` once ``optimizer`` is
    collected. Its claims lapse by themselves: they are weak references."""
    weakref.finalize(optimizer, _remove_handles, handles)
