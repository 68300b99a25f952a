#!/usr/bin/env bash
# Set up (idempotently) and run dynviz:  scripts/run.sh app | test [pytest args]
# Creates .venv if missing, installs requirements.txt and then dynviz itself (editable) when
# they changed, then starts the app or runs the whole test suite. Browser tests need Debian's
# chromium; `test` installs it with apt-get when it is missing and we are root.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
USAGE="usage: scripts/run.sh app [streamlit args] | test [pytest args]"
case "${1:-}" in
  app|test) ;;
  *) echo "$USAGE" >&2; exit 2 ;;     # before any set-up: a typo costs nothing
esac

if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.requirements.sha256
want=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip setuptools  # setuptools builds dynviz below
  .venv/bin/python -m pip install --quiet -r requirements.txt
  echo "$want" > "$stamp"
fi

# dynviz itself, editable: `import dynviz, models` from any directory and a `dynviz` command.
# Built by the venv's setuptools (no isolated build env to download); reinstalled when
# pyproject.toml changes or another checkout installed itself here since.
install_stamp=.venv/.install.sha256
install_want="$(sha256sum pyproject.toml | cut -d' ' -f1) $PWD"
if [ "$(cat "$install_stamp" 2>/dev/null)" != "$install_want" ]; then
  .venv/bin/python -m pip install --quiet --no-deps --no-build-isolation -e .
  echo "$install_want" > "$install_stamp"
fi

# The native (C++) block runner: compiled once per source version (about a minute), before
# the app or the tests need it; without a compiler the Python blocks run instead.
native_stamp="${DYNVIZ_NATIVE_DIR:-.cache/native}/.source.sha256"
native_want=$(cat models/csrc/*.cpp requirements.txt | sha256sum | cut -d' ' -f1)
if [ "${DYNVIZ_NATIVE:-1}" != 0 ] && [ "$(cat "$native_stamp" 2>/dev/null)" != "$native_want" ]; then
  if ! command -v c++ >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++ >/dev/null) \
      || echo "warning: could not install g++" >&2
  fi
  if .venv/bin/python -m dynviz native; then
    mkdir -p "$(dirname "$native_stamp")" && echo "$native_want" > "$native_stamp"
  else
    echo "warning: the native block runner could not be built; Python blocks will run" >&2
  fi
fi

case "${1:-}" in
  app)
    shift
    exec .venv/bin/python -m streamlit run app.py \
      --server.headless true --server.fileWatcherType none \
      --browser.gatherUsageStats false --server.port "${PORT:-8501}" "$@"
    ;;
  test)
    shift
    if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
        || echo "warning: could not install chromium; browser tests will be skipped" >&2
    fi
    exec .venv/bin/python -m pytest "$@"
    ;;
esac
