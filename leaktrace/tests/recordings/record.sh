#!/usr/bin/env bash
# Re-records the replay recordings from live scenarios (as root, after `cargo xtask build` and a
# `cargo xtask test` run that compiled the fixtures into target/tmp/beam-fixtures).
set -euo pipefail
cd "$(dirname "$0")/../../.."
LT=target/release/leaktrace
FIX=target/tmp/beam-fixtures
OUT=leaktrace/tests/recordings

record() { # name eval duration [leaktrace options...]
    local name=$1 eval=$2 duration=$3
    shift 3
    # shellcheck disable=SC2086 # ERL_EXTRA holds several emulator flags
    erl ${ERL_EXTRA:-} -sname "lt_rec_$name" -noshell -pa "$FIX" -eval "$eval" </dev/null &
    local pid=$!
    until epmd -names | grep -q "name lt_rec_$name "; do sleep 0.1; done
    sleep 3
    "$LT" attach --pid "$pid" --duration "$duration" --quiet --record "$OUT/$name.json" "$@" >/dev/null || true
    kill "$pid"
    wait "$pid" 2>/dev/null || true
    echo "$name: $("$LT" report "$OUT/$name.json" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["verdict"]["kind"])')"
}

# No argument: every scenario; `new`: from the second round on; `two`: the last one only;
# `blocks`: the --blocks ones only; `resident`: the levels at attach only.
STAGE=${1:-all}
[ "$STAGE" = all ] || [ "$STAGE" = blocks ] && {
record blocks_fragmentation 'lt_vm:fragment_later(4000, 400000, 40).' 16s --no-vm --blocks --max-overhead 200
record blocks_timers 'lt_vm:pile_timers(2000, 50).' 10s --no-vm --blocks --max-overhead 200
}
[ "$STAGE" != blocks ] || exit 0
[ "$STAGE" != all ] || {
record native_leak 'lt_load:leak_forever(262144, 20).' 12s
record healthy 'lt_load:healthy_forever(10).' 12s
record fragmentation 'lt_vm:fragment(400000, 40).' 8s
record vm_growth_ets 'lt_vm:grow_table(4000, 50).' 12s
record carriers_no_vm 'lt_vm:grow_table(4000, 50).' 12s --no-vm
}
[ "$STAGE" = all ] || [ "$STAGE" = resident ] && {
# A NIF's malloc'd memory, there before attach: all kept (150 MB), or 98% freed (200 MB).
touch /tmp/lt_rec_go
record malloc_held 'lt_native:hold_on_go("/tmp/lt_rec_go", "/tmp/lt_rec_held", 1024, 150000, 1).' 8s
record malloc_frag 'lt_native:hold_on_go("/tmp/lt_rec_go", "/tmp/lt_rec_frag", 1024, 200000, 50).' 8s
rm -f /tmp/lt_rec_go /tmp/lt_rec_held /tmp/lt_rec_frag
}
[ "$STAGE" != resident ] || exit 0
[ "$STAGE" = two ] || {
record persistent_term_cache 'lt_prod:persistent_cache(4000, 10).' 12s
record leaked_workers 'lt_prod:leak_workers(500, 100).' 12s
record binary_holder 'lt_prod:binary_holder(2097152, 500, 200).' 12s
ERL_EXTRA="+Mea min" record meamin_ets 'lt_vm:grow_table(4000, 50).' 12s
}
record two_problems 'spawn(fun() -> lt_load:leak_forever(65536, 20) end), lt_vm:grow_table(800, 50).' 14s
