#!/usr/bin/env bash
# Build llama.cpp (the copy vendored in the llama-cpp-python sdist) for the tests that run it, once:
# the wheel and the unpacked converter scripts are cached in $RSLORA_TOOLS_CACHE (default
# ~/.cache/rslora-tools), so later runs only install the cached wheel (seconds). A cold build takes
# about 5 minutes on 2 cores (cmake and a C++ compiler needed). tests/convert/test_llama_cpp.py finds the
# converter through the same cache folder, or through RSLORA_TOOLS_LLAMA_CPP_DIR.
set -euo pipefail
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
CACHE="${RSLORA_TOOLS_CACHE:-$HOME/.cache/rslora-tools}/llama-cpp-python-$VERSION"
mkdir -p "$CACHE/wheels"
export PIP_DISABLE_PIP_VERSION_CHECK=1
started=$(date +%s)
if ! ls "$CACHE"/wheels/llama_cpp_python-*.whl >/dev/null 2>&1; then
    pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$CACHE/sdist"
    CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" CMAKE_ARGS="-DGGML_CUDA=OFF -DLLAMA_CURL=OFF" \
        pip wheel --quiet --no-deps "$CACHE"/sdist/llama_cpp_python-"$VERSION".tar.gz -w "$CACHE/wheels"
fi
if [ ! -f "$CACHE/llama.cpp/convert_lora_to_gguf.py" ]; then
    if [ ! -d "$CACHE/sdist" ]; then
        pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$CACHE/sdist"
    fi
    tar xzf "$CACHE"/sdist/llama_cpp_python-"$VERSION".tar.gz -C "$CACHE" \
        "llama_cpp_python-$VERSION/vendor/llama.cpp/convert_hf_to_gguf.py" \
        "llama_cpp_python-$VERSION/vendor/llama.cpp/convert_lora_to_gguf.py" \
        "llama_cpp_python-$VERSION/vendor/llama.cpp/conversion" \
        "llama_cpp_python-$VERSION/vendor/llama.cpp/gguf-py"
    rm -rf "$CACHE/llama.cpp"
    mv "$CACHE/llama_cpp_python-$VERSION/vendor/llama.cpp" "$CACHE/llama.cpp"
    rm -rf "$CACHE/llama_cpp_python-$VERSION"
fi
pip install --quiet "$CACHE"/wheels/llama_cpp_python-*.whl sentencepiece
echo "llama.cpp (llama-cpp-python $VERSION) ready in $(( $(date +%s) - started )) s: $CACHE"
