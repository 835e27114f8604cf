"""SGD with momentum, Nesterov momentum and weight decay (PyTorch's update
rule, dampening 0).  It lives with the other optimisers in
hpcnn.runtime.optimizers; this name is kept for the code that imports it
from here."""
from hpcnn.runtime.optimizers import SGD

__all__ = ["SGD"]
