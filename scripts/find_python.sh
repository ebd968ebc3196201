#!/usr/bin/env bash
# Print the path of a Python >= 3.12 interpreter, or fail saying how to provide one.
# jax >= 0.11 needs 3.12+. Order: $PYTHON, python3.13/python3.12 on PATH (pyenv shims refuse
# to run unless selected, so each candidate is *executed*, not just found), pyenv's installed
# versions, then plain python3.
set -u
ok() { "$@" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1; }
resolve() { "$@" -c 'import sys; print(sys.executable)'; }
if [ -n "${PYTHON:-}" ]; then
  if ok "$PYTHON"; then resolve "$PYTHON"; exit 0; fi
  echo "PYTHON=$PYTHON is not a Python >= 3.12" >&2; exit 1
fi
for cand in python3.14 python3.13 python3.12; do
  if command -v "$cand" >/dev/null 2>&1 && ok "$cand"; then resolve "$cand"; exit 0; fi
done
root="${PYENV_ROOT:-$HOME/.pyenv}"
for py in $(ls -d "$root"/versions/3.1[2-9]* 2>/dev/null | sort -rV); do
  if [ -x "$py/bin/python" ] && ok "$py/bin/python"; then resolve "$py/bin/python"; exit 0; fi
done
if command -v python3 >/dev/null 2>&1 && ok python3; then resolve python3; exit 0; fi
echo "No Python >= 3.12 found: install one or set PYTHON=/path/to/python3.12" >&2
exit 1
