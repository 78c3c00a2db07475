"""The README's quick tour: load a pretrained ResNet-20, compress, fine-tune, save, load, evaluate (library only)."""
import os
import tempfile

import minibasis
from minibasis import data, training

shared = os.environ.get("MINIBASIS_SHARED", os.path.join(os.path.dirname(__file__), "..", "..", "shared"))
model, meta = minibasis.load_model(f"{shared}/models/akamaster/resnet20-12fca82f.th")  # depth 20 read from the keys
(x_train, y_train), (x_test, y_test) = data.load_cifar10(f"{shared}/data")
prepare = data.Compose([data.ToFloat(), data.Normalize(meta.mean, meta.std)])  # ImageNet statistics (akamaster's)

compressed, report = minibasis.compress(model, energy_threshold=0.8)
print("\n".join(report.table().splitlines()[-4:]))       # replaced layers, mults, learnable and stored values
loader = data.DataLoader((x_train[:384], y_train[:384]), batch_size=64, shuffle=True, transform=prepare)
training.fine_tune(compressed, loader, epochs1=1, lr1=0.01, epochs2=1, lr2=1e-3, progress=False)

path = os.path.join(tempfile.mkdtemp(), "resnet20-t0.8.npz")
minibasis.save_model(compressed, path, normalization="imagenet", dataset="cifar10")
loaded, saved = minibasis.load_model(path)                # architecture, BasisConv layout, normalization
for name, net in (("original", model), ("compressed, fine-tuned", loaded)):
    result = training.evaluate(net, x_test[:500], y_test[:500], transform=prepare, progress=False)
    print(f"{name}: {100 * result.accuracy:.1f}% on 500 test images")
