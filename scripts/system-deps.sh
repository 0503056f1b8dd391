#!/usr/bin/env bash
# System packages, by what needs them, installed as root and only when missing:
#   demo: the offline corpora of the embedded demo shipped by Debian (Jane Austen; the Python
#         documentation) — `make demo` runs `system-deps.sh demo`;
#   test: those, plus a local Slurm cluster (munge, slurmctld, slurmd) — `make test`.
# Without root or apt-get nothing is installed: the demo then stops with one line naming the
# missing package, and the tests that need one skip with a reason.
set -uo pipefail
demo=(python3.11-doc r-cran-janeaustenr)
test=("${demo[@]}" slurmctld slurmd slurm-client munge)
case "${1:-test}" in
  demo) want=("${demo[@]}") ;;
  test) want=("${test[@]}") ;;
  *) echo "usage: $0 [demo|test]" >&2; exit 2 ;;
esac
missing=()
for p in "${want[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "installing system packages: ${missing[*]}"
  log=$(mktemp --tmpdir homodistil-apt.XXXXXX.log)  # not a fixed name another user could plant
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${missing[@]}") \
    >"$log" 2>&1 || echo "warning: apt-get failed (see $log)"
fi
exit 0
