#!/usr/bin/env bash
# llama.cpp's converter (convert_hf_to_gguf.py with its conversion/ and gguf-py/ folders) for `lvit export --gguf`,
# unpacked into VENV/llama.cpp (VENV: the first argument, default .venv) from the llama-cpp-python source package: the same llama.cpp as the
# llama-cpp-python the tests run the GGUF files with. The package (76 MB) is downloaded once into
# ~/.cache/lvit. Point lvit at it with --llama-cpp .venv/llama.cpp or LVIT_LLAMA_CPP=.venv/llama.cpp
# (the tests find it in the virtual environment that runs them).
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/lvit
SDIST="$CACHE/llama_cpp_python-$VERSION.tar.gz"
VENV=${1:-.venv}
DEST="$VENV/llama.cpp"
if [ -f "$DEST/convert_hf_to_gguf.py" ] && [ "$(cat "$DEST/VERSION" 2>/dev/null)" = "$VERSION" ]; then
  exit 0
fi
if [ ! -f "$SDIST" ]; then
  mkdir -p "$CACHE"
  "$VENV/bin/python" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$CACHE"
fi
rm -rf "$DEST" && mkdir -p "$DEST"
PREFIX="llama_cpp_python-$VERSION/vendor/llama.cpp"
tar -xzf "$SDIST" -C "$DEST" --strip-components=3 \
  "$PREFIX/convert_hf_to_gguf.py" "$PREFIX/conversion" "$PREFIX/gguf-py" "$PREFIX/LICENSE" "$PREFIX/requirements"
echo "$VERSION" > "$DEST/VERSION"
echo "llama.cpp's converter ($VERSION) is in $DEST"
