"""Layers and models: Module, the standard layers, BasisConv2d."""
from minibasis.nn import functional
from minibasis.nn.layers import (AdaptiveAvgPool2d, AvgPool2d, BatchNorm1d, BatchNorm2d, Conv2d, Dropout,
                                 Flatten, Identity, Linear, MaxPool2d, ReLU, Sequential)
from minibasis.nn.module import Module, Parameter
from minibasis.nn.basisconv import BasisConv2d

__all__ = ["Module", "Parameter", "Conv2d", "Linear", "BatchNorm2d", "BatchNorm1d", "ReLU", "MaxPool2d",
           "AvgPool2d", "AdaptiveAvgPool2d", "Dropout", "Flatten", "Sequential", "Identity", "functional",
           "BasisConv2d"]
