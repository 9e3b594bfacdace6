#!/usr/bin/env bash
# `make test`: lint, then the whole suite. The `slurm` tests need the local test cluster (slurm/cluster.sh):
# when it is not running and this machine can start it (root or password-less sudo, Debian/Ubuntu), it is
# started here and stopped at the end; a cluster that was already up is left as it was. Where it cannot be
# started the suite still runs, and ends with one line saying how many SLURM tests were skipped and how to
# enable them (tests/slurm/conftest.py). LLM_TEST_CLUSTER=no never starts it. The budget and how to keep it:
# tests/README.md.
set -uo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
LINTED=(launcher trainer tests bench)

"$VENV/bin/ruff" check "${LINTED[@]}" || exit 1

as_root=()
can_start_cluster() {
	[[ ${LLM_TEST_CLUSTER:-yes} != no && -f /etc/debian_version ]] || return 1
	[[ $(id -u) == 0 ]] && return 0
	sudo -n true 2>/dev/null && as_root=(sudo -n)
}

stop_cluster=0
if ! bash slurm/cluster.sh status >/dev/null 2>&1 && can_start_cluster; then
	echo "make test: starting the local SLURM test cluster (slurm/cluster.sh; stopped again at the end)" >&2
	if "${as_root[@]}" bash slurm/cluster.sh start; then
		stop_cluster=1
	else
		echo "make test: the local SLURM cluster did not start; the slurm tests will be skipped" >&2
	fi
fi
LLM_TEST_SUMMARY_FILE=$(mktemp)
LLM_TEST_DURATIONS_FILE=$(mktemp)
slurm_log=$(mktemp)
export LLM_TEST_SUMMARY_FILE LLM_TEST_DURATIONS_FILE
# shellcheck disable=SC2317  # called by the trap
cleanup() {
	((stop_cluster)) && "${as_root[@]}" bash slurm/cluster.sh stop >/dev/null 2>&1
	if [[ -s $LLM_TEST_SUMMARY_FILE ]]; then
		local on='' off=''
		[[ -t 2 ]] && on=$'\033[1;31m' off=$'\033[0m'
		printf '\n%s!!! make test: %s%s\n' "$on" "$(cat "$LLM_TEST_SUMMARY_FILE")" "$off" >&2
	fi
	rm -f "$LLM_TEST_SUMMARY_FILE" "$LLM_TEST_DURATIONS_FILE" "$slurm_log"
}
trap cleanup EXIT

# Arguments (a test path, -k ...) run as given, in one pytest.
if (($#)); then
	"$VENV/bin/pytest" -q --durations=25 "$@"
	exit
fi

# The whole suite as two pytest processes at once: the SLURM tests spend most of their time waiting for jobs,
# scheduling and requeues, while the rest is CPU-bound; run one after the other they took minutes longer.
# Each appends its tests' durations to $LLM_TEST_DURATIONS_FILE (tests/conftest.py); the 25 slowest of both
# close the run.
"$VENV/bin/pytest" -q -p no:cacheprovider tests/slurm >"$slurm_log" 2>&1 &
slurm_pid=$!
"$VENV/bin/pytest" -q --ignore=tests/slurm
main_status=$?
wait "$slurm_pid"
slurm_status=$?
echo
echo "==================== SLURM tests (tests/slurm, run alongside the tests above) ===================="
cat "$slurm_log"
"$VENV/bin/python" tests/slowest.py "$LLM_TEST_DURATIONS_FILE" 25
((main_status == 0 && slurm_status == 0))
