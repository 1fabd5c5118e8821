#!/usr/bin/env bash
# Data-parallel training on this machine: launch/local.sh N [python -m distcnn.train flags...]
#
#   launch/local.sh 2 --epochs 3 --batch-size 128 --log runs/log.jsonl
#
# Starts N ranks with mpirun, each with cores/N BLAS threads (at least 1), so N ranks do not
# fight over the cores. An OMP_NUM_THREADS already set in the environment, or --threads T among
# the flags, takes precedence. Exits with the training's exit code.
#
# Which mpirun: $MPIRUN if set; else the one in the active virtualenv ($VIRTUAL_ENV/bin, where
# `pip install 'distcnn[mpi]'` puts MPICH's); else the one beside $PYTHON; else mpirun or mpiexec
# on PATH. It must belong to the MPI that mpi4py was built against.
# Which Python: $PYTHON if set; else $VIRTUAL_ENV/bin/python; else python3 on PATH.
set -euo pipefail

die() {
    echo "local.sh: error: $*" >&2
    exit 2
}

[[ $# -ge 1 ]] || die "missing N; usage: launch/local.sh N [train flags...]"
N=$1
shift
[[ $N =~ ^[1-9][0-9]*$ ]] || die "N '$N' is not a positive whole number; e.g. launch/local.sh 2"

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(dirname "$here")

if [[ -n ${PYTHON:-} ]]; then
    py=$PYTHON
elif [[ -n ${VIRTUAL_ENV:-} && -x $VIRTUAL_ENV/bin/python ]]; then
    py=$VIRTUAL_ENV/bin/python
else
    py=$(command -v python3 || true)
fi
[[ -n $py ]] && command -v "$py" >/dev/null || die "no Python found; set PYTHON or activate a venv"

if [[ -n ${MPIRUN:-} ]]; then
    command -v "$MPIRUN" >/dev/null || die "MPIRUN=$MPIRUN is not an executable; fix or unset it"
    mpirun=$MPIRUN
else
    mpirun=""
    pybin=$(dirname "$(command -v "$py")")
    for candidate in "${VIRTUAL_ENV:+$VIRTUAL_ENV/bin/mpirun}" "$pybin/mpirun" \
        "$(command -v mpirun || true)" "$(command -v mpiexec || true)"; do
        if [[ -n $candidate && -x $candidate ]]; then
            mpirun=$candidate
            break
        fi
    done
    [[ -n $mpirun ]] || die "no mpirun found in the active venv or on PATH; install the MPI" \
        "runtime with pip install 'distcnn[mpi]' (or mpich), or put your MPI's bin on PATH" \
        "(or set MPIRUN=/path/to/mpirun)"
fi

cores=$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN)
threads=$((cores / N))
((threads >= 1)) || threads=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$threads}
export OPENBLAS_NUM_THREADS=$OMP_NUM_THREADS MKL_NUM_THREADS=$OMP_NUM_THREADS
# distcnn importable from this checkout even when it is not pip-installed
export PYTHONPATH=$root${PYTHONPATH:+:$PYTHONPATH}

extra=()
if "$mpirun" --version 2>/dev/null | grep -q "Open MPI"; then
    # Open MPI refuses more ranks than cores unless told, and passes only named variables
    ((N <= cores)) || extra+=(--oversubscribe)
    extra+=(-x OMP_NUM_THREADS -x OPENBLAS_NUM_THREADS -x MKL_NUM_THREADS -x PYTHONPATH)
fi

echo "local.sh: $mpirun -n $N, OMP_NUM_THREADS=$OMP_NUM_THREADS per rank ($cores cores)" >&2
exec "$mpirun" ${extra[@]+"${extra[@]}"} -n "$N" "$py" -m distcnn.train "$@"
