#!/usr/bin/env bash
# make verify: exhaustive spin run of verify/transfer.pml — safety asserts
# and the liveness claim under weak fairness. Fails unless spin reports
# "errors: 0".
set -euo pipefail
cd "$(dirname "$0")/.."
command -v spin >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq spin; }
work=$(mktemp -d -t kvferry-verify-XXXXXX)
trap 'rm -rf "$work"' EXIT
cp verify/transfer.pml "$work/"
cd "$work"
spin -a transfer.pml >/dev/null
gcc -O2 -DNFAIR=3 -o pan pan.c 2>/dev/null
out=$(./pan -a -f -m1000000)
echo "$out" | grep -E "errors:|states, stored|unreached" | head -5
if ! echo "$out" | grep -q "errors: 0"; then
  echo "$out"
  echo "verify: spin found an error in verify/transfer.pml"
  exit 1
fi
echo "verify: ok"
