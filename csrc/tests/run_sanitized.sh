#!/usr/bin/env bash
# Build the C core with its tests under AddressSanitizer + UBSan and run them:
#   test_core    - unit, model and thread tests of the C API, and allocation failures
#                  injected into large writes (the core is built with -DSC_FAULT_INJECTION);
#                  run twice where it can be: on every CPU, and pinned to one
#   test_kv      - the key-value layer: model test with snapshot views, full-region
#                  atomicity, byte-flip fuzzing of a map in the store
#   fuzz_decode  - deterministic mutation fuzzer of the delta/checkpoint decoder
#   test_delta_pages - batch page checksums and page-list deltas (replication's parts)
# Called by .ci/run from the repo root as `bash csrc/tests/run_sanitized.sh`; works from
# anywhere. Builds in a fresh temp dir (never in the repo). Exits non-zero on any failure.
# Optional environment: CC (default gcc), FUZZ_ITERATIONS (default 20000), SEED.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
csrc="$(dirname "$here")"
cc="${CC:-gcc}"
build="$(mktemp -d "${TMPDIR:-/tmp}/statecore-sanitized.XXXXXX")"
trap 'rm -rf "$build"' EXIT

flags=(-std=c11 -D_GNU_SOURCE -DSC_FAULT_INJECTION -g -O1 -fsanitize=address,undefined
       -fno-omit-frame-pointer -fno-sanitize-recover=all -pthread -Wall -Wextra -I"$csrc")

start=$SECONDS
echo "== build ($cc, sanitized) in $build"
# Jobs run in parallel; every one is waited for (so none still writes into $build when
# the trap removes it), and any failure fails the build.
wait_all() {
    local failed=0 pid
    for pid in "$@"; do wait "$pid" || failed=1; done
    if [ "$failed" != 0 ]; then
        echo "== build FAILED" >&2
        exit 1
    fi
}
pids=()
objs=()
for src in "$csrc"/*.c; do
    obj="$build/$(basename "${src%.c}").o"
    objs+=("$obj")
    "$cc" "${flags[@]}" -c "$src" -o "$obj" &
    pids+=("$!")
done
wait_all "${pids[@]}"
"$cc" "${flags[@]}" "$here/test_core.c" "${objs[@]}" -o "$build/test_core" &
p1=$!
"$cc" "${flags[@]}" "$here/fuzz_decode.c" "${objs[@]}" -o "$build/fuzz_decode" &
p2=$!
"$cc" "${flags[@]}" "$here/test_kv.c" "${objs[@]}" -o "$build/test_kv" &
p3=$!
"$cc" "${flags[@]}" "$here/test_delta_pages.c" "${objs[@]}" -o "$build/test_delta_pages" &
p4=$!
wait_all "$p1" "$p2" "$p3" "$p4"

export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
export TMPDIR="$build" # test files (stores, checkpoints) live and die with the build dir

# A deadlock must fail CI, not hang it.
run() {
    if command -v timeout >/dev/null 2>&1; then timeout 300 "$@"; else "$@"; fi
}

status=0
echo "== test_core"
run "$build/test_core" ${SEED:+"$SEED"} || status=1
# On one CPU the core takes its single-threaded paths (no copier thread, one marking
# part, no parallel copies), which a 2-core run never reaches.
if command -v taskset >/dev/null 2>&1 && [ "$(nproc)" -gt 1 ]; then
    echo "== test_core on one CPU"
    run taskset -c 0 "$build/test_core" ${SEED:+"$SEED"} || status=1
fi
echo "== test_kv"
run "$build/test_kv" ${SEED:+"$SEED"} || status=1
echo "== test_delta_pages"
run "$build/test_delta_pages" ${SEED:+"$SEED"} || status=1
echo "== fuzz_decode"
run "$build/fuzz_decode" "${FUZZ_ITERATIONS:-20000}" ${SEED:+"$SEED"} || status=1

echo "== sanitized C tests: $([ "$status" = 0 ] && echo ok || echo FAILED) in $((SECONDS - start))s"
exit "$status"
