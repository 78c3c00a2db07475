"""minibasis: a small NumPy/CuPy deep-learning framework for the BasisConv paper."""
from minibasis import backend
from minibasis.backend import use

__version__ = "0.1.0"
