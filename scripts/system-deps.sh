#!/usr/bin/env bash
# System packages some tests use: a local Slurm cluster (munge, slurmctld, slurmd) and the
# offline corpora shipped by Debian (Python docs, Jane Austen). Installed only as root and
# only when missing; the tests that need them skip with a reason where they are absent.
set -uo pipefail
want=(slurmctld slurmd slurm-client munge python3.11-doc r-cran-janeaustenr)
missing=()
for p in "${want[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "installing system packages: ${missing[*]}"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${missing[@]}") \
    >/tmp/homodistil-apt.log 2>&1 || echo "warning: apt-get failed (see /tmp/homodistil-apt.log); dependent tests will skip"
fi
exit 0
