#!/usr/bin/env bash
# scripts/fuzz.sh SECONDS TARGET...: runs each cargo-fuzz target of fuzz/ for SECONDS (a hang
# is an input that takes more than 10 s). Installs cargo-fuzz (crates.io) and uses the nightly
# toolchain that rustup has.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=$1
shift
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi
rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
for t in "$@"; do
  mkdir -p "fuzz/corpus/$t"
  seeds=()
  [ -d "fuzz/seeds/$t" ] && seeds=("fuzz/seeds/$t")
  echo "fuzz $t for ${seconds}s"
  log="fuzz/artifacts/$t.log"
  mkdir -p fuzz/artifacts
  if ! cargo +nightly fuzz run "$t" "fuzz/corpus/$t" "${seeds[@]}" -- \
      -max_total_time="$seconds" -timeout=10 -print_final_stats=1 >"$log" 2>&1; then
    tail -n 40 "$log"
    echo "fuzz $t: FAILED (input in fuzz/artifacts/$t/, log in $log)" >&2
    exit 1
  fi
  grep -E '^stat::number_of_executed_units|^Done' "$log" | tail -n 2
done
echo "fuzz: no crash, no hang in ${seconds}s per target ($*)"
