#!/usr/bin/env bash
# Checks the root crate's module rules (src/lib.rs, "Layout"), with grep:
# 1. nothing imports `app`: `crate::app` only inside src/app/, `weft::app` only in the weft
#    binary;
# Comment lines are not code and are skipped.
# 2. only `app` spawns tasks: outside src/app/ and src/bin/, no `tokio::spawn`, `spawn_blocking`
#    or `JoinSet` before a file's `#[cfg(test)]` (tests spawn what they drive);
# 3. the pure modules do not use tokio;
# 4. no function in src/ is longer than 80 lines (a long function is steps without names).
# Prints each breach and exits non-zero when there is one.
set -euo pipefail
cd "$(dirname "$0")/.."

breaches=0
breach() { echo "layout rule $1: $2" >&2; breaches=$((breaches + 1)); }

while IFS= read -r hit; do
    breach 1 "$hit imports app"
done < <(grep -rn --include='*.rs' 'crate::app' src | grep -v '^src/app/' | grep -vE '^[^:]*:[0-9]+: *//' || true)
while IFS= read -r hit; do
    breach 1 "$hit imports app"
done < <(grep -rnE --include='*.rs' 'weft::app|weft::\{[^}]*\bapp\b' src tests bench fuzz | grep -v '^src/bin/weft.rs:' | grep -vE '^[^:]*:[0-9]+: *//' || true)

while IFS= read -r f; do
    while IFS= read -r hit; do
        breach 2 "$f:$hit spawns outside app"
    done < <(awk '/#\[cfg\(test\)\]/ { exit } /^[ \t]*\/\// { next } /tokio::spawn|spawn_blocking|JoinSet/ { print FNR": "$0 }' "$f")
done < <(find src -name '*.rs' -not -path 'src/app/*' -not -path 'src/bin/*' | sort)

for f in src/plan.rs src/control/reconcile.rs src/control/blocks.rs src/control/claims.rs src/control/k8s.rs \
    src/control/observed.rs src/control/relays.rs src/relay/wire.rs src/relay/registry.rs; do
    while IFS= read -r hit; do
        breach 3 "$f:$hit uses tokio in a pure module"
    done < <(grep -n 'tokio' "$f" | grep -v '^[0-9]*: *//' || true)
done

# A brace-matching scan by indentation: a fn's body ends at the first closing brace at its indent.
longest_fn_awk='
FNR == 1 { open = 0 }
{
    if (open) {
        if (match($0, /^ */) && RLENGTH == indent && substr($0, indent + 1, 1) == "}") {
            len = FNR - start + 1
            if (len > MAX) printf "%s:%d %s is %d lines\n", FILENAME, start, name, len
            open = 0
        }
        next
    }
    if ($0 ~ /^ *(pub(\([a-z]+\))? )?(const )?(async )?(unsafe )?fn [A-Za-z_0-9]+/ && $0 !~ /;[ ]*$/) {
        match($0, /^ */); indent = RLENGTH
        n = $0; sub(/^.*fn /, "", n); sub(/[^A-Za-z_0-9].*$/, "", n); name = n
        start = FNR; open = 1
        if ($0 ~ /}[ ]*$/ && $0 ~ /{/) { open = 0 }
    }
}'
while IFS= read -r hit; do
    breach 4 "$hit (at most ${MAX_FN_LINES:-80})"
done < <(find src -name '*.rs' | sort | xargs awk -v MAX="${MAX_FN_LINES:-80}" "$longest_fn_awk")

if [ "$breaches" -gt 0 ]; then
    echo "scripts/layout-rules.sh: $breaches breach(es) of the module rules in src/lib.rs" >&2
    exit 1
fi
echo "layout rules hold: nothing imports app, only app spawns, the pure modules use no tokio, no function over 80 lines"
