#!/usr/bin/env bash
# The local SLURM test cluster: one controller and two compute "nodes" (node1, node2) on this one host.
#
#   bash slurm/cluster.sh start    install slurm + munge if missing (apt), write the configs, start munged,
#                                  slurmctld and two slurmd, wait until both nodes are idle
#   bash slurm/cluster.sh stop     cancel all jobs, stop the daemons, remove their pid files
#   bash slurm/cluster.sh status   the daemons and sinfo; exit status 0 when all run and both nodes are up
#
# Runs as root on Debian (12: slurm 22.05). Every command is idempotent: `start` on a running cluster with
# unchanged configs only checks it (and starts any daemon that died); a changed config restarts it.
# Files: /etc/slurm/{slurm.conf,job_container.conf} (from slurm/*.in), state in /var/spool/slurm-llm, logs in
# /var/log/slurm-llm, pid files in /run/slurm-llm.
#
# Jobs get a private /tmp and /dev/shm per node (job_container/tmpfs), so anything a job shares with the
# submitter (virtual environment, run folders, data, test folders) must live outside /tmp.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

CLUSTER_NAME=${LLM_SLURM_CLUSTER_NAME:-llmtest}
PARTITION=debug # tests/slurm/slurm_helpers.py and cluster profiles name it
WAIT_S=${LLM_SLURM_WAIT_S:-90}
CONF_DIR=/etc/slurm
STATE_DIR=/var/spool/slurm-llm
LOG_DIR=/var/log/slurm-llm
RUN_DIR=/run/slurm-llm
CONTAINER_DIR=$STATE_DIR/containers
NODES=(node1 node2)
SLURMD_PORTS=17001-17002
CTLD_PORT=6817
CRED_EXPIRE=10
REQUEUE_HOLD_S=4 # see prolog_slurmctld.sh.in
MIN_JOB_AGE=60
MARKER="# llm-training local test cluster"
MUNGE_KEY=/etc/munge/munge.key
MUNGE_PID=/run/munge/munged.pid
MUNGE_STARTED=$RUN_DIR/munged.started

export SLURM_CONF=$CONF_DIR/slurm.conf

log() { echo "cluster.sh: $*" >&2; }
die() {
	log "ERROR: $*"
	exit 1
}

usage() {
	echo "usage: $0 start|stop|status" >&2
	exit 2
}

proc_alive() { # pid -> 0 when it runs (a zombie, exited but not yet reaped, does not)
	local stat
	kill -0 "$1" 2>/dev/null || return 1
	stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
	[[ ${stat##*) } != Z* ]]
}

pid_alive() { # pid file -> 0 when the process in it runs
	local pid
	[[ -s $1 ]] || return 1
	pid=$(<"$1")
	[[ $pid =~ ^[0-9]+$ ]] && proc_alive "$pid"
}

# ---------------------------------------------------------------------------------------------- install

install_packages() {
	local missing=()
	command -v slurmctld >/dev/null || missing+=(slurmctld)
	command -v slurmd >/dev/null || missing+=(slurmd)
	command -v sinfo >/dev/null || missing+=(slurm-client)
	command -v munged >/dev/null || missing+=(munge)
	((${#missing[@]})) || return 0
	command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get: install slurm (slurmctld, slurmd, slurm-client) and munge by hand"
	log "installing ${missing[*]} with apt-get"
	# Package scripts must not start the system services: this script runs its own daemons.
	local policy=/usr/sbin/policy-rc.d created_policy=0
	if [[ ! -e $policy ]]; then
		printf '#!/bin/sh\nexit 101\n' >"$policy"
		chmod 755 "$policy"
		created_policy=1
	fi
	local rc=0
	{
		DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
			DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
				-o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "${missing[@]}"
	} >&2 || rc=$?
	((created_policy)) && rm -f "$policy"
	((rc == 0)) || die "apt-get install ${missing[*]} failed (exit $rc)"
}

# ---------------------------------------------------------------------------------------------- munge

munge_works() { command -v munge >/dev/null && munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
	if [[ ! -s $MUNGE_KEY ]]; then
		log "writing a munge key to $MUNGE_KEY"
		install -d -m 700 -o munge -g munge "$(dirname "$MUNGE_KEY")"
		if command -v mungekey >/dev/null; then
			mungekey --create --keyfile="$MUNGE_KEY" --force
		else
			dd if=/dev/urandom of="$MUNGE_KEY" bs=1024 count=1 status=none
		fi
	fi
	chown munge:munge "$MUNGE_KEY"
	chmod 400 "$MUNGE_KEY"
	if munge_works; then
		return 0
	fi
	install -d -m 755 -o munge -g munge /run/munge
	install -d -m 700 -o munge -g munge /var/lib/munge /var/log/munge
	# A stale pid file or socket from a killed munged makes the new one refuse to start.
	if ! pid_alive "$MUNGE_PID"; then
		rm -f "$MUNGE_PID" /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock
	fi
	log "starting munged"
	runuser -u munge -- /usr/sbin/munged || die "munged failed to start (see /var/log/munge/munged.log)"
	touch "$MUNGE_STARTED"
	local i
	for ((i = 0; i < 50; i++)); do
		munge_works && return 0
		sleep 0.2
	done
	tail -n 20 /var/log/munge/munged.log >&2 2>/dev/null || true
	die "munged does not answer (munge -n | unmunge fails)"
}

stop_munge() {
	# Only a munged this script started: a system one stays.
	[[ -e $MUNGE_STARTED ]] || return 0
	stop_pidfile munged "$MUNGE_PID"
	rm -f "$MUNGE_STARTED"
}

# ---------------------------------------------------------------------------------------------- config

node_hardware() {
	# The node line's hardware from what slurmd detects (CPUs, boards, sockets, cores, threads), so that both
	# "nodes" offer all of the host's CPUs and slurmd never finds less than configured.
	local line
	line=$(slurmd -C 2>/dev/null | head -n 1 || true)
	if [[ $line =~ (CPUs=[0-9]+).*(Boards=[0-9]+).*(SocketsPerBoard=[0-9]+).*(CoresPerSocket=[0-9]+).*(ThreadsPerCore=[0-9]+) ]]; then
		echo "${BASH_REMATCH[1]} ${BASH_REMATCH[2]} ${BASH_REMATCH[3]} ${BASH_REMATCH[4]} ${BASH_REMATCH[5]}"
	else
		echo "CPUs=$(nproc)"
	fi
}

real_memory_mb() {
	# Half of the host's memory per node (each slurmd sees the whole host, so this never exceeds it).
	local kb
	kb=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)
	echo $((kb / 1024 / 2 / 100 * 100))
}

render() { # template -> stdout
	sed -e "s|@CLUSTER_NAME@|$CLUSTER_NAME|g" \
		-e "s|@CTLD_HOST@|$(hostname -s)|g" \
		-e "s|@CTLD_PORT@|$CTLD_PORT|g" \
		-e "s|@CRED_EXPIRE@|$CRED_EXPIRE|g" \
		-e "s|@REQUEUE_HOLD_S@|$REQUEUE_HOLD_S|g" \
		-e "s|@CONF_DIR@|$CONF_DIR|g" \
		-e "s|@STATE_DIR@|$STATE_DIR|g" \
		-e "s|@RUN_DIR@|$RUN_DIR|g" \
		-e "s|@LOG_DIR@|$LOG_DIR|g" \
		-e "s|@MIN_JOB_AGE@|$MIN_JOB_AGE|g" \
		-e "s|@SLURMD_PORTS@|$SLURMD_PORTS|g" \
		-e "s|@NODE_HARDWARE@|$NODE_HARDWARE|g" \
		-e "s|@REAL_MEMORY@|$REAL_MEMORY|g" \
		-e "s|@PARTITION@|$PARTITION|g" \
		-e "s|@CONTAINER_DIR@|$CONTAINER_DIR|g" \
		"$1"
}

# write_config template target: sets CONFIG_CHANGED=1 when the target changed
write_config() {
	local new
	new=$(render "$1")
	if grep -q '@[A-Z_]*@' <<<"$new"; then
		die "unfilled placeholder in $1: $(grep -o '@[A-Z_]*@' <<<"$new" | sort -u | tr '\n' ' ')"
	fi
	if [[ -e $2 ]]; then
		head -n 2 "$2" | grep -qF "$MARKER" ||
			die "$2 exists and was not written by this script: move it away to use the local test cluster"
		[[ $new == "$(<"$2")" ]] && return 0
	fi
	printf '%s\n' "$new" >"$2.new"
	mv "$2.new" "$2"
	log "wrote $2"
	CONFIG_CHANGED=1
}

CONFIG_CHANGED=0
write_configs() { # sets CONFIG_CHANGED=1 when a config changed
	NODE_HARDWARE=$(node_hardware)
	REAL_MEMORY=$(real_memory_mb)
	mkdir -p "$CONF_DIR"
	write_config "$HERE/slurm.conf.in" "$CONF_DIR/slurm.conf"
	write_config "$HERE/job_container.conf.in" "$CONF_DIR/job_container.conf"
	write_config "$HERE/prolog_slurmctld.sh.in" "$CONF_DIR/prolog_slurmctld.sh"
	chmod 755 "$CONF_DIR/prolog_slurmctld.sh"
}

ensure_hosts() {
	# node1/node2 must resolve: a job's master address is the first host of SLURM_JOB_NODELIST.
	local n unresolved=0
	for n in "${NODES[@]}"; do
		getent hosts "$n" >/dev/null || unresolved=1
	done
	if ((unresolved)); then
		log "adding '127.0.0.1 ${NODES[*]}' to /etc/hosts"
		echo "127.0.0.1 ${NODES[*]}" >>/etc/hosts
	fi
}

make_dirs() {
	mkdir -p "$STATE_DIR/ctld" "$CONTAINER_DIR" "$LOG_DIR" "$RUN_DIR"
	local n
	for n in "${NODES[@]}"; do
		mkdir -p "$STATE_DIR/d/$n"
	done
	# State saved under another cluster name makes slurmctld refuse to start.
	local saved=$STATE_DIR/ctld/clustername
	if [[ -s $saved && $(<"$saved") != "$CLUSTER_NAME" ]]; then
		log "clearing controller state of cluster '$(<"$saved")'"
		find "$STATE_DIR/ctld" -mindepth 1 -delete
	fi
}

# ---------------------------------------------------------------------------------------------- daemons

ctld_pidfile() { echo "$RUN_DIR/slurmctld.pid"; }
slurmd_pidfile() { echo "$RUN_DIR/slurmd-$1.pid"; }

any_daemon_running() {
	pid_alive "$(ctld_pidfile)" && return 0
	local n
	for n in "${NODES[@]}"; do
		pid_alive "$(slurmd_pidfile "$n")" && return 0
	done
	return 1
}

ctld_answers() { [[ $(timeout 10 scontrol ping 2>/dev/null) == *'is UP'* ]]; }

start_daemons() {
	if ! pid_alive "$(ctld_pidfile)"; then
		log "starting slurmctld"
		rm -f "$(ctld_pidfile)"
		local err
		# slurmctld warns that PrologFlags=Contain is meant for pam_slurm_adopt with proctrack/cgroup: here it
		# is for job_container/tmpfs, so that line is noise.
		err=$(slurmctld 2>&1) || fail "slurmctld failed to start: $err"
		grep -v 'pam_slurm_adopt' <<<"$err" >&2 || true
	fi
	local deadline=$((SECONDS + WAIT_S))
	until ctld_answers || ((SECONDS >= deadline)); do
		sleep 0.5
	done
	ctld_answers || fail "slurmctld does not answer 'scontrol ping' after ${WAIT_S}s"
	local n
	for n in "${NODES[@]}"; do
		if ! pid_alive "$(slurmd_pidfile "$n")"; then
			log "starting slurmd -N $n"
			rm -f "$(slurmd_pidfile "$n")"
			slurmd -N "$n" || fail "slurmd -N $n failed to start"
		fi
	done
}

stop_pidfile() { # name pidfile: TERM, wait, KILL; removes the pid file
	local name=$1 file=$2 pid i
	if pid_alive "$file"; then
		pid=$(<"$file")
		log "stopping $name (pid $pid)"
		kill -TERM "$pid" 2>/dev/null || true
		for ((i = 0; i < 100; i++)); do
			proc_alive "$pid" || break
			sleep 0.1
		done
		if proc_alive "$pid"; then
			log "$name (pid $pid) ignored SIGTERM for 10s: SIGKILL"
			kill -KILL "$pid" 2>/dev/null || true
			sleep 0.2
		fi
	fi
	rm -f "$file"
}

cancel_all_jobs() {
	ctld_answers || return 0
	local jobs i
	jobs=$(squeue -h -o '%i' 2>/dev/null | sort -u | tr '\n' ' ')
	[[ -n ${jobs// /} ]] || return 0
	log "cancelling jobs: $jobs"
	# shellcheck disable=SC2086 # a list of job ids
	scancel $jobs 2>/dev/null || true
	for ((i = 0; i < 60; i++)); do
		[[ -z $(squeue -h -o '%i' 2>/dev/null) ]] && return 0
		sleep 0.5
	done
	log "jobs still listed after 30s: $(squeue -h 2>/dev/null | tr '\n' ';')"
}

unmount_containers() {
	# job_container/tmpfs bind-mounts each node's BasePath onto itself when slurmd starts; drop those
	# mounts (deepest first) so that restarts do not stack them.
	local m
	while read -r m; do
		umount -l "$m" 2>/dev/null || true
	done < <(awk -v base="$CONTAINER_DIR" '$2 == base || index($2, base "/") == 1 {print $2}' /proc/self/mounts | sort -r)
}

stop_daemons() {
	cancel_all_jobs
	local n
	for n in "${NODES[@]}"; do
		stop_pidfile "slurmd $n" "$(slurmd_pidfile "$n")"
	done
	stop_pidfile slurmctld "$(ctld_pidfile)"
	unmount_containers
}

# ---------------------------------------------------------------------------------------------- waiting

node_states() { timeout 10 sinfo -h -N -p "$PARTITION" -o '%N %T' 2>/dev/null | sort -u; }

nodes_ready() { # every node of the partition idle, allocated or mixed, and as many as NODES
	local states n=0 name state
	states=$(node_states) || return 1
	while read -r name state; do
		[[ -n $name ]] || continue
		[[ $state =~ ^(idle|allocated|mixed|completing)$ ]] || return 1
		n=$((n + 1))
	done <<<"$states"
	((n == ${#NODES[@]}))
}

diagnostics() {
	{
		echo "---- sinfo"
		timeout 10 sinfo -N -l 2>&1 || true
		echo "---- sinfo -R (reasons)"
		timeout 10 sinfo -R 2>&1 || true
		local f
		for f in "$LOG_DIR"/slurmctld.log "$LOG_DIR"/slurmd-*.log /var/log/munge/munged.log; do
			[[ -e $f ]] || continue
			echo "---- tail -n 25 $f"
			tail -n 25 "$f"
		done
	} >&2
}

fail() {
	log "ERROR: $*"
	diagnostics
	exit 1
}

wait_nodes_ready() {
	local deadline=$((SECONDS + WAIT_S)) resumed=0
	while ((SECONDS < deadline)); do
		nodes_ready && return 0
		# Nodes left down or drained by an earlier run (state is saved across restarts): resume them once.
		if ((!resumed)) && node_states | grep -Eq 'down|drain|fail'; then
			log "resuming nodes: $(node_states | tr '\n' ' ')"
			timeout 10 scontrol update NodeName="$(
				IFS=,
				echo "${NODES[*]}"
			)" State=RESUME 2>/dev/null || true
			resumed=1
		fi
		sleep 1
	done
	fail "nodes not idle after ${WAIT_S}s: $(node_states | tr '\n' ' ')"
}

# ---------------------------------------------------------------------------------------------- commands

cmd_start() {
	[[ $(id -u) == 0 ]] || die "run as root (installs packages, writes /etc/slurm, starts daemons as root)"
	mkdir -p "$RUN_DIR"
	install_packages
	ensure_hosts
	make_dirs
	start_munge
	write_configs
	if ((CONFIG_CHANGED)) && any_daemon_running; then
		log "configuration changed: restarting the cluster"
		stop_daemons
	fi
	start_daemons
	wait_nodes_ready
	log "cluster '$CLUSTER_NAME' is up: partition $PARTITION, nodes ${NODES[*]}"
	timeout 10 sinfo -N -p "$PARTITION" >&2 || true
}

cmd_stop() {
	[[ $(id -u) == 0 ]] || die "run as root"
	if command -v scontrol >/dev/null; then
		stop_daemons
	fi
	stop_munge
	log "cluster stopped"
}

cmd_status() {
	command -v sinfo >/dev/null || {
		echo "slurm is not installed (run: bash $0 start)"
		return 1
	}
	local n ok=0
	show_daemon() { # name pidfile
		if pid_alive "$2"; then
			printf '%-14s running (pid %s)\n' "$1" "$(<"$2")"
		else
			printf '%-14s stopped\n' "$1"
			ok=1
		fi
	}
	show_daemon munged "$MUNGE_PID"
	show_daemon slurmctld "$(ctld_pidfile)"
	for n in "${NODES[@]}"; do
		show_daemon "slurmd $n" "$(slurmd_pidfile "$n")"
	done
	if ! ctld_answers; then
		echo "slurmctld does not answer"
		return 1
	fi
	timeout 10 sinfo || ok=1
	nodes_ready || ok=1
	return $ok
}

case ${1:-} in
start) cmd_start ;;
stop) cmd_stop ;;
status) cmd_status ;;
*) usage ;;
esac
