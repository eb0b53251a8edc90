"""Language models written the way users write them: pytorch/examples'
word_language_model (RNNModel, TransformerModel and its PositionalEncoding, here with
batch_first and norm_first options), the plainest two-layer nn.TransformerEncoder LM,
and three that cannot map. The import tests and the KV-cache benchmark build these."""

import math

import torch
import torch.nn.functional as F
from torch import nn


class RNNModel(nn.Module):
    """Container module with an encoder, a recurrent module, and a decoder."""

    def __init__(self, rnn_type, ntoken, ninp, nhid, nlayers, dropout=0.5, tie_weights=False):
        super().__init__()
        self.ntoken = ntoken
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(ntoken, ninp)
        if rnn_type in ["LSTM", "GRU"]:
            self.rnn = getattr(nn, rnn_type)(ninp, nhid, nlayers, dropout=dropout)
        else:
            nonlinearity = {"RNN_TANH": "tanh", "RNN_RELU": "relu"}[rnn_type]
            self.rnn = nn.RNN(ninp, nhid, nlayers, nonlinearity=nonlinearity, dropout=dropout)
        self.decoder = nn.Linear(nhid, ntoken)
        if tie_weights:
            if nhid != ninp:
                raise ValueError("When using the tied flag, nhid must be equal to emsize")
            self.decoder.weight = self.encoder.weight
        self.init_weights()
        self.rnn_type = rnn_type
        self.nhid = nhid
        self.nlayers = nlayers

    def init_weights(self):
        initrange = 0.1
        nn.init.uniform_(self.encoder.weight, -initrange, initrange)
        nn.init.zeros_(self.decoder.bias)
        nn.init.uniform_(self.decoder.weight, -initrange, initrange)

    def forward(self, input, hidden):
        emb = self.drop(self.encoder(input))
        output, hidden = self.rnn(emb, hidden)
        output = self.drop(output)
        decoded = self.decoder(output)
        decoded = decoded.view(-1, self.ntoken)
        return F.log_softmax(decoded, dim=1), hidden

    def init_hidden(self, bsz):
        weight = next(self.parameters())
        if self.rnn_type == "LSTM":
            return (
                weight.new_zeros(self.nlayers, bsz, self.nhid),
                weight.new_zeros(self.nlayers, bsz, self.nhid),
            )
        return weight.new_zeros(self.nlayers, bsz, self.nhid)


class PositionalEncoding(nn.Module):
    """Inject some information about the relative or absolute position of the tokens."""

    def __init__(self, d_model, dropout=0.1, max_len=5000, batch_first=False):
        super().__init__()
        self.dropout = nn.Dropout(p=dropout)
        self.batch_first = batch_first
        pe = torch.zeros(max_len, d_model)
        position = torch.arange(0, max_len, dtype=torch.float).unsqueeze(1)
        div_term = torch.exp(torch.arange(0, d_model, 2).float() * (-math.log(10000.0) / d_model))
        pe[:, 0::2] = torch.sin(position * div_term)
        pe[:, 1::2] = torch.cos(position * div_term)
        pe = pe.unsqueeze(0) if batch_first else pe.unsqueeze(0).transpose(0, 1)
        self.register_buffer("pe", pe)

    def forward(self, x):
        x = x + (self.pe[:, : x.size(1), :] if self.batch_first else self.pe[: x.size(0), :])
        return self.dropout(x)


class TransformerModel(nn.Module):
    """Container module with an encoder, a transformer module, and a decoder."""

    def __init__(
        self, ntoken, ninp, nhead, nhid, nlayers, dropout=0.5, batch_first=False, norm_first=False
    ):
        super().__init__()
        self.model_type = "Transformer"
        self.src_mask = None
        self.batch_first = batch_first
        self.pos_encoder = PositionalEncoding(ninp, dropout, batch_first=batch_first)
        encoder_layers = nn.TransformerEncoderLayer(
            ninp, nhead, nhid, dropout, batch_first=batch_first, norm_first=norm_first
        )
        norm = nn.LayerNorm(ninp) if norm_first else None
        self.transformer_encoder = nn.TransformerEncoder(
            encoder_layers, nlayers, norm=norm, enable_nested_tensor=False
        )
        self.encoder = nn.Embedding(ntoken, ninp)
        self.ninp = ninp
        self.decoder = nn.Linear(ninp, ntoken)
        self.init_weights()

    def _generate_square_subsequent_mask(self, sz):
        return torch.log(torch.tril(torch.ones(sz, sz)))

    def init_weights(self):
        initrange = 0.1
        nn.init.uniform_(self.encoder.weight, -initrange, initrange)
        nn.init.zeros_(self.decoder.bias)
        nn.init.uniform_(self.decoder.weight, -initrange, initrange)

    def forward(self, src, has_mask=True):
        if has_mask:
            length = src.size(1) if self.batch_first else src.size(0)
            if self.src_mask is None or self.src_mask.size(0) != length:
                self.src_mask = self._generate_square_subsequent_mask(length).to(src.device)
        else:
            self.src_mask = None
        src = self.encoder(src) * math.sqrt(self.ninp)
        src = self.pos_encoder(src)
        output = self.transformer_encoder(src, self.src_mask)
        output = self.decoder(output)
        return F.log_softmax(output, dim=-1)


class TinyTransformerLM(nn.Module):
    """The plainest: embedding, two encoder layers under a causal mask, a linear head."""

    def __init__(self, vocab_size, d_model=32, nhead=2):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, d_model)
        layer = nn.TransformerEncoderLayer(d_model, nhead, dim_feedforward=64)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.lm_head = nn.Linear(d_model, vocab_size)

    def forward(self, x):  # x: [seq, batch]
        mask = nn.Transformer.generate_square_subsequent_mask(x.size(0))
        return self.lm_head(self.encoder(self.embed(x), mask=mask, is_causal=True))


class BidirectionalLSTM(RNNModel):
    def __init__(self, ntoken, ninp=32, nhid=32):
        super().__init__("LSTM", ntoken, ninp, nhid, 1, dropout=0.0)
        self.rnn = nn.LSTM(ninp, nhid, bidirectional=True)
        self.decoder = nn.Linear(2 * nhid, ntoken)


class UnmaskedTransformerLM(TinyTransformerLM):
    def forward(self, x):
        return self.lm_head(self.encoder(self.embed(x)))


class MyAttention(nn.Module):
    """A hand-written attention, dropped into nn.TransformerEncoderLayer."""

    def __init__(self, d_model, nhead):
        super().__init__()
        self.nhead = nhead
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.batch_first = False

    def forward(self, q, k, v, attn_mask=None, key_padding_mask=None, **kwargs):
        T, B, C = q.shape
        q, k, v = self.qkv(q).view(T, B, 3, self.nhead, -1).permute(2, 1, 3, 0, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        return self.proj(y.permute(2, 0, 1, 3).reshape(T, B, C)), None


class CustomAttentionLM(TinyTransformerLM):
    def __init__(self, vocab_size, d_model=32, nhead=2):
        super().__init__(vocab_size, d_model, nhead)
        for layer in self.encoder.layers:
            layer.self_attn = MyAttention(d_model, nhead)
