"""fold_in_backward's hooks: a post-accumulate-grad hook on every parameter of such a group
hands its gradient to the optimizer the moment autograd has finished it.

The hook holds the optimizer weakly: an optimizer dropped without ``remove_hooks()`` leaves hooks
that do nothing, and gradients then accumulate in ``.grad`` as usual."""
import functools
import weakref


def _fold_hook(optimizer_ref, param):
    optimizer = optimizer_ref()
    if optimizer is not None:
        optimizer._fold_in_backward(param)


def register_fold_hooks(optimizer, params):
    """Register the hook on each parameter that requires grad; return the handles."""
    hook = functools.partial(_fold_hook, weakref.ref(optimizer))
    return [p.register_post_accumulate_grad_hook(hook) for p in params if p.requires_grad]
