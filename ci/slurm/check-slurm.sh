#!/usr/bin/env bash
# CI check of ArborSeg on SLURM: start the one-node cluster (as root) if it is not running, then run
# two phantom participants locally, through --plugin SLURMGraph and as an `sbatch --array` job and
# compare the derivatives (ci/slurm/check_slurm.py). Exit status 0 when they are all equal.
#
#   ci/slurm/check-slurm.sh [ROOT]      # ROOT: data, outputs and work dirs (default /tmp/arborseg-slurm-check)
#
# PYTHON selects the interpreter that has ArborSeg installed (default: .venv/bin/python of the
# repository, else python3); the arborseg command next to it is used.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
ROOT=${1:-/tmp/arborseg-slurm-check}
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=$(command -v python3)

if ! sinfo --noheader --format=%T 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
    if [ "$(id -u)" = 0 ]; then
        "$HERE/start-local-slurm.sh"
    else
        sudo "$HERE/start-local-slurm.sh"
    fi
fi
export NIPYPE_NO_ET=1 ARBORSEG_OFFLINE=1
cd "$REPO"
exec "$PYTHON" "$HERE/check_slurm.py" "$ROOT"
