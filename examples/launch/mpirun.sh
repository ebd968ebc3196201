#!/bin/bash
# Open MPI 4 (ORTE) mpirun, one process per host, all of its GPUs. Run it on the first host of
# the hostfile: rank 0 runs there, and jtp takes jax's coordinator from mpirun's own address
# (OMPI_MCA_orte_hnp_uri), the port from the job id. Open MPI 5 names no such address: add
# -x JAX_COORDINATOR_ADDRESS=<first host>:<free port>.
# Usage: HOSTFILE=hosts.txt examples/launch/mpirun.sh --model llama ...
mpirun -np 2 --npernode 1 --hostfile "${HOSTFILE:-hosts.txt}" python -m jtp.train "$@"
