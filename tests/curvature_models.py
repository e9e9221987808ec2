"""Small dict-batch models for the curvature tests, and dense references built with ``torch.func``."""

from __future__ import annotations

import torch
from torch.func import functional_call, hessian
from transformers.modeling_outputs import SequenceClassifierOutput


class TinyClassifier(torch.nn.Module):
    """A tanh MLP head with the ``transformers`` interface: ``forward(features, labels)`` -> loss, logits."""

    def __init__(self, features: int = 4, hidden: int = 5, classes: int = 3, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.classes = classes
        self.net = torch.nn.Sequential(
            torch.nn.Linear(features, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, classes)
        )

    def forward(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> SequenceClassifierOutput:
        logits = self.net(features)
        loss = None
        if labels is not None:
            if self.classes == 1:
                loss = torch.nn.functional.mse_loss(logits.squeeze(-1), labels.float())
            else:
                loss = torch.nn.functional.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


def classifier_batches(n: int = 24, features: int = 4, classes: int = 3, chunk: int = 10, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g)
    y = torch.randn(n, generator=g) if classes == 1 else torch.randint(0, classes, (n,), generator=g)
    return [{"features": x[i : i + chunk], "labels": y[i : i + chunk]} for i in range(0, n, chunk)]


def dense_hessian(model: torch.nn.Module, batches: list[dict]) -> torch.Tensor:
    """The Hessian of the example-weighted mean loss over the trainable parameters, by torch.func.hessian."""
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    shapes = [p.shape for name, p in model.named_parameters() if p.requires_grad]
    flat0 = torch.cat([p.detach().reshape(-1) for name, p in model.named_parameters() if p.requires_grad])
    sizes = [int(b["labels"].shape[0]) for b in batches]

    def loss(flat: torch.Tensor) -> torch.Tensor:
        params, offset = {}, 0
        for name, shape in zip(names, shapes):
            count = int(torch.Size(shape).numel())
            params[name] = flat[offset : offset + count].view(shape)
            offset += count
        total = sum(s * functional_call(model, params, args=(), kwargs=b).loss for s, b in zip(sizes, batches))
        return total / sum(sizes)

    model.eval()
    return hessian(loss)(flat0).detach()
