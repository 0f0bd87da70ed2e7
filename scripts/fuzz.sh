#!/usr/bin/env bash
# Fuzzes the decoders that take bytes from outside (fuzz/fuzz_targets): a client's context token,
# clocks and their merges, a replica stream page, the configuration file.
#
#   scripts/fuzz.sh                    # every target for FUZZ_SECONDS (10) each: the CI run
#   FUZZ_SECONDS=3600 scripts/fuzz.sh clock_merge   # a long run of one target
#
# Installs cargo-fuzz (from crates.io, pinned) when missing. Builds on the stable toolchain
# without a sanitizer (`-s none`: coverage-guided, panics and failed assertions are the
# findings). The corpus grows in fuzz/corpus/TARGET (kept between runs, not committed); a finding
# is written to fuzz/artifacts/TARGET/ and fails the run, with the command that replays it.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

CARGO_FUZZ_VERSION=0.13.2
SECONDS_EACH=${FUZZ_SECONDS:-10}
SEED=${FUZZ_SEED:-1}

if ! cargo fuzz --version 2>/dev/null | grep -qF "$CARGO_FUZZ_VERSION"; then
  echo "fuzz.sh: installing cargo-fuzz $CARGO_FUZZ_VERSION" >&2
  cargo install --locked cargo-fuzz --version "$CARGO_FUZZ_VERSION" >&2
fi

mapfile -t all < <(cargo fuzz list)
targets=("$@")
((${#targets[@]})) || targets=("${all[@]}")

cargo fuzz build -s none -O >&2
failed=()
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t"
  echo "fuzz.sh: $t for $SECONDS_EACH s (seed $SEED)" >&2
  if ! cargo fuzz run -s none -O "$t" "corpus/$t" -- \
    -max_total_time="$SECONDS_EACH" -seed="$SEED" -print_final_stats=1 2>"corpus/$t.log"; then
    tail -n 40 "corpus/$t.log" >&2
    echo "fuzz.sh: $t FAILED; replay: (cd fuzz && cargo fuzz run -s none -O $t artifacts/$t/FILE)" >&2
    failed+=("$t")
  else
    grep -E '^(Done|stat::number_of_executed_units|stat::new_units_added)' "corpus/$t.log" |
      sed "s/^/fuzz.sh: $t: /" >&2 || true
  fi
done
if ((${#failed[@]})); then
  echo "fuzz.sh: findings in: ${failed[*]}" >&2
  exit 1
fi
echo "fuzz.sh: ${#targets[@]} targets, no finding" >&2
