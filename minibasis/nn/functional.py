"""``minibasis.nn.functional``: the differentiable ops, under PyTorch's familiar name."""
from minibasis.functions import *  # noqa: F401,F403
from minibasis.functions import __all__  # noqa: F401
