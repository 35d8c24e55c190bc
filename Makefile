# Verbs for the export cache. `make up` is the quick start; `make help` lists the rest.
SHELL := /bin/bash
VENV_BIN := $(CURDIR)/.local/venv/bin
export PATH := $(VENV_BIN):$(PATH)

.PHONY: help up test lint fmt bench bench-worker build deploy bootstrap

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

up: ## quick start: emulator, provision, seed, functions, bridge, demo export (UP_EXIT=1 to stop after the demo)
	@infra/scripts/up.sh

test: ## cfn-lint + cargo test --workspace against a moto server on a free port
	@infra/scripts/test.sh

lint: ## rustfmt check and clippy with warnings as errors
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

fmt: ## format the workspace
	cargo fmt --all

bench: ## the encoders alone (no AWS); release build
	cargo bench -p shared --bench encoders

bench-worker: ## the worker's path through the SDK into moto's S3 (BENCH_ROWS=1000000,10000000)
	@infra/scripts/bench-worker.sh

build: ## debug build of every crate
	cargo build --workspace --all-targets

bootstrap: ## install the pinned Python tools into .local/venv
	@infra/scripts/bootstrap.sh

deploy: bootstrap ## build with SAM (cargo-lambda) and deploy interactively
	@command -v sam >/dev/null || { echo "sam not found: install the AWS SAM CLI (e.g. pip install aws-sam-cli)"; exit 1; }
	sam build && sam deploy --guided
