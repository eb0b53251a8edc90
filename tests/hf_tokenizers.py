"""Small Hugging Face tokenizers trained here (no download), one of each decoder kind
edgegen reads. Each builder returns the text of its tokenizer.json."""

import functools

from tokenizers import (
    SentencePieceBPETokenizer,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    trainers,
)

CORPUS = (
    "The quick brown fox jumps over the lazy dog. 東京は日本の首都です。🚀🎉 emoji! "
    "def f(x):\n    return x  +  1\n\n\tindented\t\ttabs   spaces Ünïcödé café "
) * 20
CHAT_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
SENTENCEPIECE_TOKENS = ["<unk>", "<s>", "</s>"]
BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]


@functools.cache
def byte_level_bpe() -> str:
    """GPT-2 / Qwen style: ByteLevel pre-tokenizer and decoder, chat special tokens."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=CHAT_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator([CORPUS], trainer)
    return tokenizer.to_str()


@functools.cache
def llama_bpe() -> str:
    """Llama / Mistral style SentencePiece BPE: "▁" for spaces, byte fallback, and the
    decoder Replace, ByteFallback, Fuse, Strip."""
    tokenizer = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
    )
    tokenizer.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SENTENCEPIECE_TOKENS + BYTE_TOKENS)
    tokenizer.train_from_iterator([CORPUS.replace(" ", "▁")], trainer)
    return tokenizer.to_str()


@functools.cache
def metaspace_bpe() -> str:
    """`tokenizers`' SentencePieceBPETokenizer: NFKC, Metaspace pre-tokenizer and decoder."""
    tokenizer = SentencePieceBPETokenizer()
    tokenizer.train_from_iterator([CORPUS], vocab_size=300, special_tokens=SENTENCEPIECE_TOKENS)
    return tokenizer.to_str()


KINDS = {"byte-level": byte_level_bpe, "llama": llama_bpe, "metaspace": metaspace_bpe}
