#!/usr/bin/env bash
# Build skiff's fuzz targets (fuzz/, libFuzzer + SanitizerCoverage on the stable toolchain) and run
# each for a bounded time. Prints per target the executions per second and coverage; exits
# non-zero when a target crashed (the input is kept under the artifacts folder it names).
#
#   scripts/fuzz.sh [TARGET|all] [SECONDS]      (default: all, 20 s each)
#
# Environment: CARGO_TARGET_DIR (default fuzz/target); FUZZ_CORPUS (default
# $CARGO_TARGET_DIR/fuzz-corpus: the growing corpus, kept between runs, not in the tree);
# FUZZ_ARGS (extra libFuzzer flags). In-tree seeds (fuzz/seeds/TARGET) and regression inputs
# (fuzz/regressions/TARGET) are read at start-up and never written to.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
which=${1:-all}
secs=${2:-20}

triple=$(rustc -vV | sed -n 's/^host: //p')
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$root/fuzz/target}
corpus_root=${FUZZ_CORPUS:-$CARGO_TARGET_DIR/fuzz-corpus}
artifacts=$CARGO_TARGET_DIR/fuzz-artifacts
# What cargo-fuzz passes without a sanitizer: libFuzzer's coverage feedback (inline 8-bit
# counters, PC table, comparison tracing) from LLVM's SanitizerCoverage pass, which stable
# rustc runs on request. With `--target`, the flags skip build scripts and proc macros.
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cforce-frame-pointers=yes"
export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-never}

mapfile -t all < <(sed -n 's/^name = "\(.*\)"$/\1/p' fuzz/Cargo.toml | grep -v '^skiff-fuzz$')
if [ "$which" = all ]; then
    targets=("${all[@]}")
    bins=(--bins)
else
    if ! printf '%s\n' "${all[@]}" | grep -qx "$which"; then
        echo "fuzz: no target $which; targets: ${all[*]}" >&2
        exit 2
    fi
    targets=("$which")
    bins=(--bin "$which")
fi

t0=$(date +%s)
echo "fuzz: building ${#targets[@]} target(s) for $triple in $CARGO_TARGET_DIR"
(cd fuzz && cargo build --release --locked --target "$triple" "${bins[@]}")
echo "fuzz: built in $(( $(date +%s) - t0 )) s"

mkdir -p "$artifacts"
failed=()
summary=()
for t in "${targets[@]}"; do
    bin=$CARGO_TARGET_DIR/$triple/release/$t
    corpus=$corpus_root/$t
    mkdir -p "$corpus" "$artifacts/$t"
    dirs=("$corpus")
    for d in fuzz/seeds/$t fuzz/regressions/$t; do
        [ -d "$d" ] && dirs+=("$root/$d")
    done
    log=$artifacts/$t.log
    echo "fuzz: $t for $secs s"
    rc=0
    # shellcheck disable=SC2086
    "$bin" -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        -artifact_prefix="$artifacts/$t/" ${FUZZ_ARGS:-} "${dirs[@]}" >"$log" 2>&1 || rc=$?
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
    first=$(grep -m1 -E 'INITED' "$log" | grep -oE 'cov: [0-9]+ ft: [0-9]+' || true)
    last=$(grep -E '^#[0-9]+' "$log" | tail -1 | grep -oE 'cov: [0-9]+ ft: [0-9]+ corp: [0-9]+' || true)
    line=$(printf '%-18s %8s exec/s %10s execs  start [%s]  end [%s]' "$t" "${rate:-?}" "${execs:-?}" "${first:-?}" "${last:-?}")
    if [ "$rc" -ne 0 ]; then
        line="$line  CRASH (exit $rc)"
        failed+=("$t")
        grep -E 'panicked at|ERROR: libFuzzer|Test unit written|SUMMARY' "$log" | head -20 || true
    fi
    echo "fuzz: $line"
    summary+=("$line")
done

echo "fuzz: summary (${secs} s per target, $(( $(date +%s) - t0 )) s in all)"
printf '  %s\n' "${summary[@]}"
if [ "${#failed[@]}" -ne 0 ]; then
    echo "fuzz: crashes in: ${failed[*]} (inputs and logs under $artifacts)" >&2
    exit 1
fi
