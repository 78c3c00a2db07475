"""PyTorch habits in minibasis: ModuleList, ReLU(inplace), CrossEntropyLoss, AdamW, a cosine schedule, Tensor batches."""
import minibasis as mb
from minibasis import data, nn, optim


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)])
        self.relu = nn.ReLU(inplace=True)                  # accepted; always computed out of place
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        for conv in self.blocks:
            x = self.relu(conv(x))
        return self.head(x.flatten(2).max(dim=2).values)  # global max pooling


mb.manual_seed(0)
(x_train, y_train), _ = data.synthetic(num_train=1024, num_test=0, image_size=16, seed=0)
prepare = data.Compose([data.ToFloat(), data.Normalize(0.5, 0.25)])
loader = data.DataLoader((x_train, y_train), batch_size=64, shuffle=True, seed=0, transform=prepare)
model, loss_fn = Net(), nn.CrossEntropyLoss(label_smoothing=0.1)
optimizer = optim.AdamW(model.parameters(), lr=1e-2)
scheduler = optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=5)
for epoch in range(5):
    for x, y in loader:                                    # Tensors, as PyTorch's loader yields
        loss = loss_fn(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    scheduler.step()
    print(f"epoch {epoch + 1}: batch {x.size()}, last loss {loss.item():.3f}, lr {scheduler.get_last_lr()[0]:.5f}")
print(list(model.state_dict())[:4])
