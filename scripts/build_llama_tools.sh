#!/usr/bin/env bash
# Build llama.cpp's own command-line tools (llama-bench, llama-perplexity, llama-eval-callback), once,
# into a cache folder, from the llama.cpp source that llama-cpp-python's sdist vendors
# (vendor/llama.cpp). They are the anchors for speed and perplexity: llama-cpp-python's per-token
# eval adds Python overhead of its own and is built without native flags.
#
#   scripts/build_llama_tools.sh            build if not built yet; print the folder of the binaries
#   scripts/build_llama_tools.sh --force    build again
#
# The folder is $REFENGINE_LLAMA_TOOLS, or ~/.cache/refengine/llama-tools/<version>/bin; the tests and
# scripts find the binaries there (refengine.testing.llama_tools). About 6 minutes on 2 cores.
set -euo pipefail

VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"  # the oracle extra's llama-cpp-python (pyproject.toml)
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/refengine/llama-tools/$VERSION"
BIN="${REFENGINE_LLAMA_TOOLS:-$CACHE/bin}"
TOOLS=(llama-bench llama-perplexity llama-eval-callback)
PYTHON="${PYTHON:-python3}"

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
    sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
    exit 0
fi
if [[ "${1:-}" != "--force" ]]; then
    built=1
    for tool in "${TOOLS[@]}"; do [[ -x "$BIN/$tool" ]] || built=0; done
    if [[ $built == 1 ]]; then echo "$BIN"; exit 0; fi
fi

work="$(mktemp -d "${TMPDIR:-/tmp}/llama-tools.XXXXXX")"
trap 'rm -rf "$work"' EXIT
echo "build_llama_tools: fetching the llama-cpp-python $VERSION sdist" >&2
"$PYTHON" -m pip download --quiet --no-deps --no-binary :all: --dest "$work" "llama-cpp-python==$VERSION" >&2
tar -xzf "$work"/llama_cpp_python-"$VERSION".tar.gz -C "$work"
src="$work/llama_cpp_python-$VERSION/vendor/llama.cpp"

# Native code for this CPU, as a user building llama.cpp would get it, except where the CPU advertises
# AMX: these virtual machines advertise it without enabling it, and ggml's AMX path then faults
# (SIGSEGV in libggml-cpu), so that case gets the Makefile's portable AVX-512 target.
if grep -qw amx_tile /proc/cpuinfo; then
    cpu_flags=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON
        -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AVX512_VBMI=ON)
else
    cpu_flags=(-DGGML_NATIVE=ON)
fi
echo "build_llama_tools: building ${TOOLS[*]} (${cpu_flags[*]})" >&2
cmake -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF "${cpu_flags[@]}" >"$work/cmake.log" 2>&1 ||
    { tail -30 "$work/cmake.log" >&2; exit 1; }
cmake --build "$work/build" --config Release -j "$(nproc)" --target "${TOOLS[@]}" >"$work/build.log" 2>&1 ||
    { tail -30 "$work/build.log" >&2; exit 1; }
mkdir -p "$BIN"
for tool in "${TOOLS[@]}"; do
    install -m 0755 "$work/build/bin/$tool" "$BIN/$tool"
done
echo "$BIN"
