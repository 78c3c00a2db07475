"""Optimizers (SGD, Adam, AdamW) and learning-rate schedules, PyTorch's update rules.

``optim.lr_scheduler`` holds the schedules, as in PyTorch (``StepLR`` is also here as
``optim.StepLR``). Optimizers and schedules have ``state_dict``/``load_state_dict``, which
training checkpoints save so a resumed run continues exactly.
"""
from minibasis.optim import lr_scheduler
from minibasis.optim.adam import Adam, AdamW
from minibasis.optim.lr_scheduler import CosineAnnealingLR, LRScheduler, MultiStepLR, StepLR
from minibasis.optim.optimizer import Optimizer
from minibasis.optim.sgd import SGD

__all__ = ["Optimizer", "SGD", "Adam", "AdamW", "lr_scheduler", "LRScheduler", "StepLR", "MultiStepLR",
           "CosineAnnealingLR"]
