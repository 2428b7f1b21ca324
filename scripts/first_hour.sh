#!/usr/bin/env bash
# A new user's first hour, after `pip install -e '.[dev]'`, in a temporary directory: the smoke
# job, the student into the BentoML Model Store, `bentoml build`, the built Bento exported, imported
# into a fresh BentoML home and served by an interpreter that cannot import this project (what a
# container or another machine is), one request, then `compressor recommend`. Prints what worked;
# exits non-zero on the first step that fails (its log is printed).
#
#   bash scripts/first_hour.sh                 # uses .venv/bin/python if present, else python3
#   PYTHON=/path/to/python bash scripts/first_hour.sh
#   KEEP=1 bash scripts/first_hour.sh          # keep the temporary directory
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-$([ -x "$ROOT/.venv/bin/python" ] && echo "$ROOT/.venv/bin/python" || echo python3)}"
WORK="$(mktemp -d -t first_hour.XXXXXX)"
SERVER_PID=""
cleanup() {
  [ -n "$SERVER_PID" ] && kill -- "-$SERVER_PID" 2>/dev/null || true
  [ -n "${KEEP:-}" ] && echo "kept $WORK" || rm -rf "$WORK"
}
trap cleanup EXIT
export BENTOML_DO_NOT_TRACK=true HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
unset PYTHONPATH

step() {  # step NAME COMMAND...: run it, log to $WORK/NAME.log, print the outcome and seconds
  local name="$1"; shift
  local t0=$SECONDS
  if "$@" >"$WORK/${name//\//_}.log" 2>&1; then
    printf '  ok      %-34s %4d s\n' "$name" $((SECONDS - t0))
  else
    printf '  FAILED  %-34s %4d s  (log below)\n' "$name" $((SECONDS - t0))
    tail -n 30 "$WORK/${name//\//_}.log"
    exit 1
  fi
}

serve_and_ask() {  # the imported Bento, served by the clean interpreter; one /recommend
  local port
  port="$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
  (cd "$WORK" && exec setsid env BENTOML_HOME="$WORK/deploy-home" "$WORK/clean/bin/python" -m bentoml serve \
     recsys-recommender:latest --host 127.0.0.1 --port "$port" >"$WORK/server.log" 2>&1) &
  SERVER_PID=$!
  for _ in $(seq 1 180); do
    if curl -fs "http://127.0.0.1:$port/readyz" >/dev/null 2>&1; then
      curl -fsS "http://127.0.0.1:$port/recommend" -H 'Content-Type: application/json' \
           -d '{"history": [1, 50, 260], "k": 5}'
      echo
      return 0
    fi
    kill -0 "$SERVER_PID" 2>/dev/null || { cat "$WORK/server.log"; return 1; }
    sleep 1
  done
  cat "$WORK/server.log"; return 1
}

clean_env() {  # a venv that sees the installed packages but not this project's editable install
  "$PYTHON" -m venv --without-pip "$WORK/clean"
  local site dev_site
  site="$("$WORK/clean/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  dev_site="$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  echo "$dev_site" >"$site/development-packages.pth"
  ! (cd "$WORK" && "$WORK/clean/bin/python" -c 'import compressor.teacher' 2>/dev/null)
}

echo "first hour in $WORK (python: $PYTHON)"
cd "$ROOT"
step "1 smoke job"             "$PYTHON" -m compressor run --config smoke --out "$WORK/run" -q
step "2 student -> model store" env BENTOML_HOME="$WORK/build-home" "$PYTHON" -m serving.model_store "$WORK/run/student" recsys-student
step "3 bentoml build"         env BENTOML_HOME="$WORK/build-home" "$PYTHON" -m bentoml build "$ROOT"
step "4 bentoml export"        env BENTOML_HOME="$WORK/build-home" "$PYTHON" -m bentoml export recsys-recommender:latest "$WORK/recsys.bento"
step "5 clean environment"     clean_env
step "6 bentoml import (clean)" env BENTOML_HOME="$WORK/deploy-home" "$WORK/clean/bin/python" -m bentoml import "$WORK/recsys.bento"
step "7 serve and ask recommend" serve_and_ask
step "8 compressor recommend"  "$PYTHON" -m compressor recommend "$WORK/run/student" --data ml-latest-small --k 10 --out "$WORK/recs.parquet" -q
"$PYTHON" -c 'import pandas as pd, sys; d = pd.read_parquet(sys.argv[1]); print(f"  {d.user.nunique()} users, {len(d)} rows in recs.parquet")' "$WORK/recs.parquet"
cut -c1-300 "$WORK/7 serve and ask recommend.log"
echo "first hour: everything worked"
