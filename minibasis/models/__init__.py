"""The model zoo (32×32 inputs): the paper's nets, following the bearpaw CIFAR zoo, and akamaster's ResNets."""
from minibasis.models.table3 import Table3CNN, table3_cnn
from minibasis.models.alexnet import AlexNet, alexnet
from minibasis.models.vgg import VGG, vgg, vgg11, vgg13, vgg16, vgg19
from minibasis.models.resnet import (ResNetCIFAR, resnet_cifar, resnet20, resnet32, resnet44, resnet56,
                                     resnet110, resnet1202)
from minibasis.models.densenet import DenseNetBC, densenet_bc, densenet190
from minibasis.models.mobilenet import MobileNetV2, mobilenet_v2
from minibasis.models.demo import DemoCNN, demo_cnn
from minibasis.models.registry import MODELS, canonical_architecture, get_model, model_names, register_model

__all__ = ["Table3CNN", "table3_cnn",
           "AlexNet", "alexnet", "VGG", "vgg", "vgg11", "vgg13", "vgg16", "vgg19",
           "ResNetCIFAR", "resnet_cifar", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet1202",
           "DenseNetBC", "densenet_bc", "densenet190", "MobileNetV2", "mobilenet_v2", "DemoCNN", "demo_cnn",
           "MODELS", "canonical_architecture", "get_model", "model_names",
           "register_model"]
