# The two commands: `make demo` (set up, then fine-tune SmolLM2-135M-Instruct with MoS, against PEFT LoRA)
# and `make test` (set up, then run the whole test suite). Both start from a fresh machine.
.PHONY: setup demo test sanitize bench

setup:
	./scripts/setup.sh

demo: setup
	.venv/bin/python -m mos demo

test: setup
	.venv/bin/python -m pytest -q tests

# The suite under AddressSanitizer + UndefinedBehaviorSanitizer (rebuilds the extension).
sanitize: setup
	./scripts/sanitize.sh

bench: setup
	.venv/bin/python benchmarks/bench_cpu.py
	.venv/bin/python benchmarks/bench_torch.py
