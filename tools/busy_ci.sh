#!/usr/bin/env bash
# The README's test command on a fresh clone while N CPU-bound processes keep the cores busy (issue 20): a suite
# that fails because the machine is slow tells a user their install is broken when it is not. Prints the wall
# time and the result; the busy processes are stopped however the run ends.
#   bash tools/busy_ci.sh                  # N = nproc busy processes; clone HEAD, python3 -m venv, pip install -e ".[dev]"
#   bash tools/busy_ci.sh --busy 0         # the same on an otherwise idle machine, for the time side by side
#   bash tools/busy_ci.sh --venv PATH      # reuse PATH's installed packages (a venv with fclora's dev requirements,
#                                          # e.g. a clone's .venv) instead of installing them: the clone gets its own
#                                          # .venv that sees PATH's packages and installs only fclora, editable, from the clone
#   bash tools/busy_ci.sh --keep           # keep the clone and its log (kept anyway when the run fails)
#   bash tools/busy_ci.sh --cmd 'CMD'      # run CMD in the clone instead of the tests (a check of this script)
# The clone sees ../shared (the real model and data) when this repository has one beside it, as CI's checkout does.
# Skips are listed with their reasons and the 30 slowest steps in the log (PYTEST_ADDOPTS="-rs --durations=30"; the
# command itself is the README's, verbatim).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
BUSY=$(nproc) VENV="" KEEP=0 ONLY=""
while (($#)); do
  case "$1" in
    --busy) BUSY=$2; shift 2 ;;
    --venv) VENV=$(cd "$2" && pwd); shift 2 ;;
    --keep) KEEP=1; shift ;;
    --cmd) ONLY=$2; shift 2 ;;
    -h|--help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "busy_ci.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

TMP=$(mktemp -d "${TMPDIR:-/tmp}/busy-ci.XXXXXX")
[[ -d "$REPO/../shared" ]] && ln -s "$(cd "$REPO/../shared" && pwd)" "$TMP/shared"
LOG="$TMP/log.txt"
PIDS=()
stop_busy() { for p in "${PIDS[@]:-}"; do [[ -n "$p" ]] && kill "$p" 2>/dev/null || true; done; PIDS=(); }
trap stop_busy EXIT INT TERM

git clone -q --no-hardlinks "$REPO" "$TMP/fclora"
cd "$TMP/fclora"
echo "busy_ci.sh: $(git log -1 --format='%h %s' | cut -c1-80)" | tee "$LOG"
echo "busy_ci.sh: $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')), $BUSY busy processes, clone in $TMP/fclora" | tee -a "$LOG"

for ((i = 0; i < BUSY; i++)); do python3 -c 'while True: pass' & PIDS+=($!); done

start=$(date +%s)
set +e
if [[ -z "$VENV" ]]; then
  CMD='python3 -m venv .venv && .venv/bin/pip install --no-compile -e ".[dev]" && .venv/bin/nbdev_test && .venv/bin/pytest tests'
else  # the same command after the install, in an environment that reuses $VENV's packages
  python3 -m venv .venv
  "$VENV/bin/python" -c 'import sys; print("\n".join(p for p in sys.path if p.endswith("-packages")))' \
    > "$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/zz-reused-venv.pth"
  for d in share etc; do [[ -d "$VENV/$d" ]] && ln -s "$VENV/$d" ".venv/$d"; done   # Jupyter's templates and kernel specs
  for f in "$VENV"/bin/*; do  # the console scripts (pytest, nbdev_test, jupyter, ...), run by the clone's python
    n=$(basename "$f"); [[ -e ".venv/bin/$n" ]] && continue
    if head -c 2 "$f" | grep -q '#!'; then sed "1s|^#!.*python.*$|#!$PWD/.venv/bin/python|" "$f" > ".venv/bin/$n"; chmod +x ".venv/bin/$n"; fi
  done
  .venv/bin/pip install -q --no-deps --no-build-isolation --no-index -e . >> "$LOG" 2>&1
  where=$(.venv/bin/python -c 'import fclora; print(fclora.__file__)')
  [[ "$where" == "$PWD/"* ]] || { echo "busy_ci.sh: fclora comes from $where, not the clone: use another --venv" >&2; exit 2; }
  CMD='.venv/bin/nbdev_test && .venv/bin/pytest tests'
fi
CMD=${ONLY:-$CMD}
echo "busy_ci.sh: $CMD" | tee -a "$LOG"
PYTEST_ADDOPTS="-rs --durations=30" env -u PYTHONDONTWRITEBYTECODE bash -c "$CMD" >> "$LOG" 2>&1   # as .ci/run does (see there)
rc=$?
set -e
took=$(( $(date +%s) - start ))
stop_busy
load=$(cut -d' ' -f1-3 /proc/loadavg)

grep -E '^(SKIPPED|FAILED|ERROR)' "$LOG" | tail -40 || true
summary=$(grep -E '^=+ .*(passed|failed|error).* in ' "$LOG" | tail -1 | tr -d '=' | sed 's/^ *//' || true)
echo "busy_ci.sh: $BUSY busy processes on $(nproc) cores: $([[ $rc == 0 ]] && echo PASS || echo "FAIL (exit $rc)") in ${took} s" \
     "(pytest: ${summary:-no summary: see the log}; load average at the end $load; install: $([[ -n $VENV ]] && echo "reused $VENV" || echo pip))"
if [[ $rc == 0 && $KEEP == 0 ]]; then rm -rf "$TMP"; else echo "busy_ci.sh: log $LOG"; fi
exit $rc
