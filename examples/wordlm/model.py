import torch
from torch import nn


class WordLM(nn.Module):
    def __init__(self, ntoken, d_model=64, nhead=4, nlayers=2):
        super().__init__()
        self.embed = nn.Embedding(ntoken, d_model)
        layer = nn.TransformerEncoderLayer(d_model, nhead, dim_feedforward=4 * d_model)
        self.encoder = nn.TransformerEncoder(layer, nlayers)
        self.decoder = nn.Linear(d_model, ntoken)

    def forward(self, src):  # src: [seq, batch] word ids
        mask = nn.Transformer.generate_square_subsequent_mask(src.size(0))
        return self.decoder(self.encoder(self.embed(src), mask=mask, is_causal=True))
