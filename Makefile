# poodle: the two commands a new user types are `make demo` and `make test`.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
ORT_VERSION := 1.31.1

DATASET ?= sample
ROOT ?=
OUT ?= out/$(DATASET)
MODEL ?= models/tvl1_flow.json
DEVICE ?= cpu
PREP_ARGS ?=
CARGO_RELEASE := cargo build --release -p poodle-prep

.PHONY: setup build build-train build-cuda clippy-cuda check-candle-patch gpu-check demo prep train experiment-camvid test fmt clippy bench bench-dp bench-prep-gpu clean

## setup: ffmpeg/ffprobe (apt-get where it can, else the command to run), and a Python venv with
## PyPI's ONNX Runtime (the library ort loads) and zarr (interop tests).
setup: $(VENV)/.ok
$(VENV)/.ok: tools/requirements.txt tools/system-deps.sh
	tools/system-deps.sh
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q -r tools/requirements.txt
	touch $@

build:
	$(CARGO_RELEASE)

## prep: prepare a dataset: make prep DATASET=bdd ROOT=/data/bdd100k OUT=/data/prep
## (Slurm arrays: SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT pick the part.)
prep: setup build
	./target/release/poodle-prep prep --config manifests/$(DATASET).json \
	  $(if $(ROOT),--root $(ROOT)) --out $(OUT) --model $(MODEL) --device $(DEVICE) $(PREP_ARGS)

## demo: the sample dashcam clips -> store, then a summary and a picture of one pair.
demo: DATASET = sample
demo: prep
	./target/release/poodle-prep inspect $(OUT)/sample-part-00000-of-00001.zarr
	./target/release/poodle-prep show $(OUT)/sample-part-00000-of-00001.zarr --pair 0 --out $(OUT)/pair0.png

build-train:
	cargo build --release -p poodle-train

## build-cuda: poodle-train (feature cuda, cuDNN ops) and poodle-prep for GPU machines, built
## here without a GPU: nvcc 13.0 from PyPI (.venv-cuda), candle-core patched at build time for
## cudarc's dynamic loading, one build per compute capability in target-cuda/sm<cap>; stripped
## binaries in dist/cuda-sm<cap>/. CUDA_CAPS="90 80" (H100/H200, A100); cold: ~25 min a cap on
## 2 cores. Never touches target/ or the CPU build.
CUDA_CAPS ?= 90 80
build-cuda:
	CUDA_CAPS="$(CUDA_CAPS)" nice -n 19 tools/cuda/build.sh

## clippy-cuda: cargo clippy -D warnings with the cuda feature (the code CI cannot build), in
## the first cap's target-cuda dir: about a minute after a build-cuda (cold: as slow as one).
clippy-cuda:
	CUDA_CAPS="$(CUDA_CAPS)" nice -n 19 tools/cuda/build.sh clippy

## check-candle-patch: the CUDA build's patched candle-core (first gradients stored, not added
## into zeros: tools/cuda/patch_backprop.py) checked on the CPU: candle-core's own gradient,
## custom-op, convolution and tensor tests on the patched copy, then one ResNet-50 PooDLe step
## (PRESET=paper PAIRS=2 HEIGHT=128 WIDTH=256) on both builds with equal gradients and each
## build's forward and backward seconds. Builds in target-patched/; ~15 min cold on 2 cores.
check-candle-patch:
	nice -n 19 tools/cuda/check-candle-patch.sh

## gpu-check: dist/gpu-check.tar.xz for the device tool's H100/H200 (the sm_90 poodle-train,
## tools/cuda/gpu-check.sh, the PyTorch baselines; builds that cap only, whatever CUDA_CAPS
## says); there, gpu-check.sh runs op and training-step parity and the candle-vs-PyTorch
## benchmarks in under 8 minutes. The one-shot device call: docs/cuda.md. GPU_CHECK_CAP=80
## packs an sm_80 build for other cards.
GPU_CHECK_CAP ?= 90
gpu-check:
	CUDA_CAPS="$(GPU_CHECK_CAP)" nice -n 19 tools/cuda/build.sh
	GPU_CHECK_CAP="$(GPU_CHECK_CAP)" tools/cuda/pack-gpu-check.sh

## train: pre-train the demo configuration (ResNet-18, 64x128 crops; CPU) on the store that
## `make demo` prepared. TRAIN_ARGS adds options, e.g. TRAIN_ARGS="--resume".
TRAIN_CONFIG ?= tiny
TRAIN_ARGS ?= --set run.max_steps=20
train: build-train
	@test -d out/sample || { echo "no out/sample: run make demo first"; exit 1; }
	./target/release/poodle-train train --config $(TRAIN_CONFIG) --stores out/sample \
	  --run-dir runs/demo --device $(DEVICE) $(TRAIN_ARGS)

## experiment-camvid: prep CamVid train pairs, pre-train PooDLe / dense-only / pooled-only with
## one budget, linear readout on CamVid val for each and for a random encoder; table in
## runs/camvid-summary.md. STEPS=180 (default) takes about 30 minutes on a 2-core CPU.
experiment-camvid: setup
	cargo build --release -p poodle-prep -p poodle-train
	DEVICE=$(DEVICE) MODEL=$(MODEL) PY=$(VENV)/bin/python bash bench/experiment_camvid.sh

fmt:
	cargo fmt --all -- --check

# The MPI backend of data-parallel training is built and tested with the rest (Open MPI from
# tools/system-deps.sh); CUDA stays out of these targets.
FEATURES := --features poodle-train/mpi

clippy:
	cargo clippy --workspace --all-targets $(FEATURES) -- -D warnings

## test: formatting, lints, every test (needs setup for ONNX Runtime and zarr-python).
test: setup fmt clippy
	cargo test --workspace $(FEATURES)

bench: setup build
	$(VENV)/bin/python bench/prep_stages.py

## bench-dp: data-parallel step time, world size 1 vs 2 (MPI, CPU), and all-reduce bytes.
bench-dp: build
	bash bench/data_parallel.sh

## bench-prep-gpu: a bundle for the GPU machine (out/bench-prep-gpu/run.sh) that measures prep
## end to end against ONNX Runtime alone and torchvision RAFT; not run here (no GPU). About
## 500 MB: over the device tool's 64 MiB a call (bench/prep_gpu.sh says what it would take).
bench-prep-gpu: setup
	PY=$(VENV)/bin/python bash bench/prep_gpu.sh

clean:
	rm -rf out
