"""Train a small CNN on scikit-learn's digits with learnable weight companders,
then fold them into plain weights for inference.

    python examples/train_with_compander.py
"""
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

import reparam
from reparam.optim import param_groups, weight_decay_penalty

torch.manual_seed(0)
digits = load_digits()
x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8)
y = torch.tensor(digits.target)
train_x, test_x, train_y, test_y = train_test_split(x, y, test_size=0.3, random_state=0, stratify=y)

model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                      nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 4 * 4, 10))
# Every conv and linear weight becomes w = a·atan(v/b), one learnable (a, b) per layer.
compander = {"method": "compander", "a": 0.5, "b": 1.0, "learnable": True}
print(reparam.convert(model, {"Conv2d": compander, "Linear": compander}, progress=False))

# Weight decay on v only, never on a or b; a and b at a tenth of the learning rate.
optimizer = torch.optim.SGD(param_groups(model, weight_decay=5e-4, ab_lr=0.005), lr=0.05, momentum=0.9)
for epoch in range(15):
    for idx in torch.randperm(len(train_x)).split(64):
        loss = F.cross_entropy(model(train_x[idx]), train_y[idx]) + weight_decay_penalty(model, 5e-4)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

model.eval()
with torch.no_grad():
    logits = model(test_x)
print(f"test accuracy: {(logits.argmax(1) == test_y).float().mean():.4f}")
for name, module in model.named_modules():
    if hasattr(module, "parametrizations"):
        c = module.parametrizations.weight[0]
        print(f"layer {name}: learned a = {c.a.item():.3f}, b = {c.b.item():.3f}")

print("folded into plain weights:", reparam.fold(model))
with torch.no_grad():
    print("same outputs after folding:", torch.allclose(model(test_x), logits, atol=1e-5))
