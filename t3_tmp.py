import sys; sys.path.insert(0, "tests")
from test_onnx_networks import *
import onnx
net = torch_network("shufflenet_v2"); export(net, "/tmp/sh.onnx", 17)
g = onnx.load("/tmp/sh.onnx").graph
for n in g.node:
    if n.op_type not in ("Conv", "BatchNormalization", "Relu"): print(n.op_type, list(n.input), list(n.output), [(a.name, onnx.helper.get_attribute_value(a)) for a in n.attribute if a.name != "value"])
