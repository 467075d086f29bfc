"""METHODS.md §8's fixed logits (B = 4, C = 4, float64), shared by the reference-value tests."""

import torch

Z_S = torch.tensor([[2.0, 1.0, 0.1, -1.0], [0.5, 0.3, -0.2, 1.5], [0.0, -0.5, 1.0, 0.2],
                    [1.2, 0.8, -0.3, 0.0]], dtype=torch.float64)
Z_T = torch.tensor([[3.0, 0.5, 0.0, -2.0], [0.0, 1.0, -1.0, 2.5], [-1.0, 0.0, 2.0, 0.5],
                    [2.0, 0.0, -1.0, -0.5]], dtype=torch.float64)
Y = torch.tensor([0, 3, 2, 1])
