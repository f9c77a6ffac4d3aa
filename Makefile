# jina-embeddings-v3 on SageMaker. `make help` lists the targets.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# The torch build to install. The default resolves to the CPU wheel on machines that carry it and to
# the CUDA build from PyPI elsewhere; override e.g. TORCH_SPEC='torch==2.6.0' or TORCH_SPEC= to keep yours.
TORCH_SPEC ?= torch==2.13.0
CHECKPOINT ?= fixtures/jina-v3-tiny
PYTEST_ARGS ?=

.DEFAULT_GOAL := help

help: ## List the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN{FS=":.*## "}{printf "  \033[36m%-10s\033[0m %s\n",$$1,$$2}'

$(VENV)/.installed: pyproject.toml inference/requirements.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	@if [ -n "$(TORCH_SPEC)" ]; then $(VENV)/bin/pip install -q "$(TORCH_SPEC)"; fi
	$(VENV)/bin/pip install -q -e ".[engine,infra,dev]" -c inference/requirements.txt
	touch $@

setup: $(VENV)/.installed ## Create .venv with everything (engine, client, infra, dev tools)

run: setup ## Package the embedded tiny checkpoint, serve it locally, embed samples via boto3
	$(PY) -m model_package.quickstart --checkpoint $(CHECKPOINT)

test: setup ## Run the whole test suite (the first run also builds the DLC stack into ~/.cache/jv3)
	$(PY) -m pytest $(PYTEST_ARGS)

test-containers: setup ## Only the archive in the DLC's serving stack and the BYOC entrypoint (root, Python 3.12, Java)
	$(PY) -m pytest tests/containers -s $(PYTEST_ARGS)

lint: setup ## ruff over the code, hadolint over the Dockerfile
	$(VENV)/bin/ruff check inference model_package jv3 infra tests bench
	$(VENV)/bin/hadolint Dockerfile

package: setup ## Build model.tar.gz from CHECKPOINT
	$(PY) -m model_package --checkpoint $(CHECKPOINT) --output model.tar.gz

serve: setup ## Serve CHECKPOINT on http://127.0.0.1:8080 (SageMaker container contract)
	$(PY) -m inference.serve --model-dir $(CHECKPOINT) --port 8080

synth: setup ## Synthesise every CDK stack into infra/cdk.out/ (no AWS credentials needed)
	cd infra && $(abspath $(PY)) app.py

deploy: setup ## cdk deploy --all (needs AWS credentials, npx, and JV3_MODEL_ARTIFACT; see docs/deploy.md)
	@test -n "$$JV3_MODEL_ARTIFACT" || { echo "error: set JV3_MODEL_ARTIFACT to model.tar.gz (make package) or s3://bucket/key.tar.gz" >&2; exit 1; }
	cd infra && JV3_REQUIRE_ARTIFACT=true npx --yes aws-cdk@2.1148.1 deploy --all --require-approval broadening --app "$(abspath $(PY)) app.py"

bench: setup ## CPU benchmarks; figures go to bench/RESULTS.md
	$(PY) -m bench.engine_speed --size mid --device cpu --reps 3 --out bench/cpu.json && $(PY) -m bench.report

clean: ## Remove build outputs
	rm -rf cdk.out infra/cdk.out build dist model.tar.gz

.PHONY: help setup run test test-containers lint package serve synth deploy bench clean
