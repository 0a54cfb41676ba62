# The two commands: `make demo` (set up, then fine-tune SmolLM2-135M-Instruct with MoS, against PEFT LoRA)
# and `make test` (set up, then run the whole test suite). Both start from a fresh machine.
.PHONY: setup demo test wheels sanitize bench

setup:
	./scripts/setup.sh

demo: setup
	.venv/bin/python -m mos demo

# The suite, then the package path: sdist and manylinux wheel built, each installed into a fresh
# venv and smoke-tested from outside the tree (scripts/check_package.sh).
test: setup
	.venv/bin/python -m pytest -q tests
	./scripts/check_package.sh

# dist/: the sdist and the manylinux wheel (scripts/build_wheels.sh).
wheels: setup
	./scripts/build_wheels.sh dist

# The suite under AddressSanitizer + UndefinedBehaviorSanitizer (rebuilds the extension).
sanitize: setup
	./scripts/sanitize.sh

bench: setup
	.venv/bin/python benchmarks/bench_cpu.py
	.venv/bin/python benchmarks/bench_torch.py
