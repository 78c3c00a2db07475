import sys; sys.path.insert(0, "tests")
from test_onnx_networks import *
import minibasis as mb
net = torch_network("resnet"); export(net, "/tmp/r.onnx", 17)
m = load_model("/tmp/r.onnx")
p = mb.measure.profile(m, (1, 3, SIZE, SIZE), backward=True)
print(p.rows[0] if hasattr(p, "rows") else p)
s = mb.summary(m, (1, 3, SIZE, SIZE)); print(str(s)[:600])
f = mb.fuse_batch_norm(m, (1, 3, SIZE, SIZE))
x = images(); print(abs(run_mb(f, x) - run_mb(m, x)).max(), [type(f.get_submodule(k)).__name__ for k in ("bn1", "layer1.0.bn1")])
