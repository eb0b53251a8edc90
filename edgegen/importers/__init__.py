"""Foreign models -> edgegen checkpoints. One module per source: hf.py (Hugging Face
directories), gguf.py (GGUF files), module.py (the user's own nn.Module).

Every source is first read into a `ForeignModel` in Hugging Face's terms (config.json
fields, parameter names and layouts, tokenizer.json), so one mapping turns them all
into edgegen's GPT.
"""
