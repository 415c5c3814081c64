"""A layer file next to a template: scmc runs it only with --allow-module untrusted_layers."""

import torch


class MyLayer(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x
