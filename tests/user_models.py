"""Models users bring, for the tests of what is mixed and sent (no MPI here)."""

import torch

VOCAB, WIDTH, CONTEXT = 12, 8, 6


class FineTuned(torch.nn.Module):
    """What a user brings to fine-tune: a frozen backbone, BatchNorm, an output layer
    tied to the embedding, a trainable parameter this task never uses, and a causal
    mask of -inf, a non-persistent buffer that two blocks share."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, WIDTH)
        self.backbone = torch.nn.Linear(WIDTH, WIDTH).requires_grad_(False)
        self.norm = torch.nn.BatchNorm1d(WIDTH)
        self.out = torch.nn.Linear(WIDTH, VOCAB, bias=False)
        self.out.weight = self.embed.weight
        self.unused = torch.nn.Parameter(torch.ones(3))
        mask = torch.full((CONTEXT, CONTEXT), -float("inf")).triu(1)
        self.blocks = torch.nn.ModuleList([torch.nn.Module(), torch.nn.Module()])
        for block in self.blocks:
            block.register_buffer("mask", mask, persistent=False)

    def forward(self, tokens):
        h = self.embed(tokens)
        for block in self.blocks:
            scores = h @ h.transpose(1, 2) / WIDTH ** 0.5 + block.mask
            h = h + scores.softmax(-1) @ h
        h = torch.relu(self.backbone(h))
        return self.out(self.norm(h.transpose(1, 2)).transpose(1, 2))
