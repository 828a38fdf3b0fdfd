# Sourced by the script tests: sets $python to an interpreter with matplotlib -- $PYTHON, python3, or
# the system one that scripts/install-deps.sh provides (a pyenv or venv python3 may shadow it) -- and
# fails the test, naming the fix, when there is none.
python=""
for py in ${PYTHON:-} python3 /usr/bin/python3; do
  "$py" -c "import matplotlib" 2>/dev/null && { python=$py; break; }
done
if [ -z "$python" ]; then
  echo "FAIL: no python3 with matplotlib (scripts/install-deps.sh installs python3-matplotlib)"
  exit 1
fi
