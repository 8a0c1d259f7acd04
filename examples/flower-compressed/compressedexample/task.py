"""The model, the data and the training loop: nothing here knows about compression."""

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(64, 64), nn.Linear(64, 10)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


def load_data(partition_id: int, num_partitions: int):
    """An IID share of scikit-learn's digits for one partition, and the common test set."""
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, test = order[:1400], order[1400:]
    mine = train[partition_id::num_partitions]
    return (x[mine], y[mine]), (x[test], y[test])


def train(net, data, steps: int, lr: float, batch_size: int, seed: int) -> float:
    x, y = data
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    total = 0.0
    for _ in range(steps):
        idx = torch.randint(0, len(y), (batch_size,), generator=g)
        loss = F.cross_entropy(net(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        total += float(loss)
    return total / steps


@torch.no_grad()
def test(net, data) -> tuple[float, float]:
    x, y = data
    logits = net(x)
    return float(F.cross_entropy(logits, y)), float((logits.argmax(1) == y).float().mean())
