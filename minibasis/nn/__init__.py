"""Layers and models: Module, the standard layers, containers, BasisConv2d."""
from minibasis.nn import functional
from minibasis.nn.layers import (AdaptiveAvgPool2d, AvgPool2d, BatchNorm1d, BatchNorm2d, Conv2d, CrossEntropyLoss,
                                 Dropout, Dropout2d, Flatten, Identity, Linear, LogSoftmax, MaxPool2d, ReLU, Sequential,
                                 Softmax)
from minibasis.nn.containers import ModuleDict, ModuleList
from minibasis.nn.module import Module, Parameter
from minibasis.nn.basisconv import BasisConv2d

__all__ = ["Module", "Parameter", "Conv2d", "Linear", "BatchNorm2d", "BatchNorm1d", "ReLU", "Softmax", "LogSoftmax",
           "CrossEntropyLoss", "MaxPool2d", "AvgPool2d", "AdaptiveAvgPool2d", "Dropout", "Dropout2d", "Flatten",
           "Sequential", "ModuleList", "ModuleDict", "Identity", "functional", "BasisConv2d"]
