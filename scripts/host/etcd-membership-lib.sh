# shellcheck shell=bash
# Shared by etcd-member-recovery, etcd-member-promote and etcd-spare-watch.
# Sourced, never run. Reads /etc/etcd/cluster.env (docs/host-layout.md) and
# wraps the few etcdctl calls that membership changes need, so that every
# program applies the same guards: quorum arithmetic, one replacement at a
# time (an etcd lock with a TTL-ed lease), and stale-learner clean-up.

KCP_CLUSTER_ENV=${KCP_CLUSTER_ENV:-/etc/etcd/cluster.env}
KCP_PROG=${KCP_PROG:-${0##*/}}

# Keys in etcd used to serialize replacements (see docs/self-healing.md).
KCP_LOCK_NAME=kcp/member-replacement
KCP_JOIN_PREFIX=kcp/join/

kcp_log() { printf '%s: %s\n' "$KCP_PROG" "$*" >&2; }
kcp_die() {
	local code=$1
	shift
	kcp_log "ERROR: $*"
	exit "$code"
}

# kcp_load_env: source cluster.env, check the contract, set defaults.
kcp_load_env() {
	[[ -r $KCP_CLUSTER_ENV ]] || kcp_die 2 "cannot read $KCP_CLUSTER_ENV"
	# shellcheck source=/dev/null
	. "$KCP_CLUSTER_ENV"
	local v
	for v in KCP_MEMBER_NAME KCP_PEER_URL KCP_CLIENT_URL KCP_MEMBERS \
		KCP_CLIENT_ENDPOINTS KCP_ETCD_CA KCP_ETCD_CERT KCP_ETCD_KEY KCP_DATA_DIR; do
		[[ -n ${!v:-} ]] || kcp_die 2 "$v is not set in $KCP_CLUSTER_ENV"
	done
	KCP_JOIN_ENV=${KCP_JOIN_ENV:-/run/etcd/join.env}
	KCP_CLUSTER_FORMED_FILE=${KCP_CLUSTER_FORMED_FILE:-/etc/etcd/cluster-formed}
	KCP_RESTORED_FILE=${KCP_RESTORED_FILE:-/run/etcd/restored}
	KCP_STATE_DIR=${KCP_STATE_DIR:-/var/lib/kcp}
	KCP_ETCDCTL=${KCP_ETCDCTL:-etcdctl}
	KCP_LOCK_TTL_SECONDS=${KCP_LOCK_TTL_SECONDS:-30}
	KCP_LOCK_WAIT_SECONDS=${KCP_LOCK_WAIT_SECONDS:-90}
	KCP_JOIN_TIMEOUT_SECONDS=${KCP_JOIN_TIMEOUT_SECONDS:-300}
	KCP_PROMOTE_TIMEOUT_SECONDS=${KCP_PROMOTE_TIMEOUT_SECONDS:-300}
	KCP_SPARE_TAKEOVER_AFTER_SECONDS=${KCP_SPARE_TAKEOVER_AFTER_SECONDS:-300}
	KCP_MEMBER_ID_FILE=${KCP_MEMBER_ID_FILE:-$KCP_DATA_DIR/member/kcp-member-id}
	# etcdctl refuses ETCDCTL_* variables that shadow flags we pass.
	local e
	for e in $(compgen -e ETCDCTL_); do
		[[ $e == ETCDCTL_API ]] || unset "$e"
	done
	export ETCDCTL_API=3
	PATH=/usr/local/bin:$PATH
	command -v "$KCP_ETCDCTL" >/dev/null || kcp_die 2 "etcdctl not found ($KCP_ETCDCTL)"
}

# kcp_ctl ENDPOINTS ARGS...: etcdctl with this host's client certificate.
# Certificates are passed as paths, never as content.
kcp_ctl() {
	local endpoints=$1
	shift
	"$KCP_ETCDCTL" --endpoints="$endpoints" --cacert="$KCP_ETCD_CA" \
		--cert="$KCP_ETCD_CERT" --key="$KCP_ETCD_KEY" \
		--dial-timeout="${KCP_DIAL_TIMEOUT:-2s}" \
		--command-timeout="${KCP_COMMAND_TIMEOUT:-5s}" "$@"
}

# kcp_etcdctl_minor: "3.4", "3.5", ... of the installed etcdctl.
kcp_etcdctl_minor() {
	"$KCP_ETCDCTL" version 2>/dev/null |
		sed -n 's/^etcdctl version: \([0-9]*\.[0-9]*\).*/\1/p'
}

# kcp_require_learner_support: learners (member add --learner, member
# promote) exist from etcd 3.4 on; older releases must not be used.
kcp_require_learner_support() {
	local minor
	minor=$(kcp_etcdctl_minor)
	[[ -n $minor ]] || kcp_die 2 "cannot read the etcdctl version"
	local major=${minor%%.*} rest=${minor#*.}
	if ((major < 3 || (major == 3 && rest < 4))); then
		kcp_die 2 "etcdctl $minor has no learner support; 3.4 or newer is required"
	fi
}

# kcp_other_endpoints: configured client URLs without this host's own.
kcp_other_endpoints() {
	local out=() ep parts=()
	IFS=, read -r -a parts <<<"$KCP_CLIENT_ENDPOINTS"
	for ep in "${parts[@]}"; do
		[[ $ep == "$KCP_CLIENT_URL" ]] || out+=("$ep")
	done
	local IFS=,
	printf '%s\n' "${out[*]}"
}

# Member table filled by kcp_fetch_members: parallel arrays, one entry per
# member, parsed from `member list -w simple`:
# "ID, status, name, peerURLs, clientURLs, isLearner" (3.4 and 3.5 alike).
M_ID=()
M_STARTED=()
M_NAME=()
M_PEERS=()
M_CLIENTS=()
M_LEARNER=()

# kcp_fetch_members ENDPOINTS: 0 when some member answered. member list is
# served from a member's local view, so it answers without quorum too.
kcp_fetch_members() {
	local out line
	M_ID=() M_STARTED=() M_NAME=() M_PEERS=() M_CLIENTS=() M_LEARNER=()
	[[ -n $1 ]] || return 1
	out=$(kcp_ctl "$1" member list -w simple 2>/dev/null) || return 1
	while IFS= read -r line; do
		[[ -n $line ]] || continue
		local f=()
		IFS=$'\x1f' read -r -a f <<<"${line//, /$'\x1f'}"
		M_ID+=("${f[0]}")
		M_STARTED+=("${f[1]}")
		M_NAME+=("${f[2]:-}")
		M_PEERS+=("${f[3]:-}")
		M_CLIENTS+=("${f[4]:-}")
		M_LEARNER+=("${f[5]:-false}")
	done <<<"$out"
	((${#M_ID[@]} > 0))
}

# kcp_member_endpoints: client URLs of all started voters, comma separated,
# plus the configured ones (a spare that took over a slot is not in the
# configuration until the stack is updated).
kcp_member_endpoints() {
	local i urls=() parts=()
	for i in "${!M_ID[@]}"; do
		[[ ${M_LEARNER[i]} == true || -z ${M_CLIENTS[i]} ]] && continue
		IFS=, read -r -a parts <<<"${M_CLIENTS[i]}"
		urls+=("${parts[@]}")
	done
	IFS=, read -r -a parts <<<"$KCP_CLIENT_ENDPOINTS"
	urls+=("${parts[@]}")
	printf '%s\n' "${urls[@]}" | { grep -v -x -F "$KCP_CLIENT_URL" || true; } |
		sort -u | paste -sd, -
}

# kcp_peer_in URLS URL: whether the comma separated URLS contain URL.
kcp_peer_in() { [[ ,$1, == *",$2,"* ]]; }

# kcp_slot_indexes NAME PEER_URL: indexes of members holding that slot,
# matched by name or peer URL (a stale member may carry either).
kcp_slot_indexes() {
	local i
	for i in "${!M_ID[@]}"; do
		if [[ -n ${M_NAME[i]} && ${M_NAME[i]} == "$1" ]] || kcp_peer_in "${M_PEERS[i]}" "$2"; then
			printf '%s\n' "$i"
		fi
	done
}

# kcp_member_index_by_id ID
kcp_member_index_by_id() {
	local i
	for i in "${!M_ID[@]}"; do
		[[ ${M_ID[i]} == "$1" ]] && {
			printf '%s\n' "$i"
			return 0
		}
	done
	return 1
}

# kcp_probe_health: fills M_HEALTHY[i] (true/false) for every member by a
# quorum read (`endpoint health`) against its own client URLs, in parallel
# so that dead members cost one timeout, not one each.
M_HEALTHY=()
kcp_probe_health() {
	local tmp i
	tmp=$(mktemp -d)
	for i in "${!M_ID[@]}"; do
		# Never started, or this very host while its etcd is stopped.
		if [[ -z ${M_CLIENTS[i]} || (${KCP_SELF_DOWN:-false} == true && ${M_CLIENTS[i]} == "$KCP_CLIENT_URL") ]]; then
			echo false >"$tmp/$i"
			continue
		fi
		(
			if KCP_DIAL_TIMEOUT=1s KCP_COMMAND_TIMEOUT=2s \
				kcp_ctl "${M_CLIENTS[i]}" endpoint health >/dev/null 2>&1; then
				echo true >"$tmp/$i"
			else
				echo false >"$tmp/$i"
			fi
		) &
	done
	wait
	M_HEALTHY=()
	for i in "${!M_ID[@]}"; do
		M_HEALTHY[i]=$(cat "$tmp/$i")
	done
	rm -rf "$tmp"
}

# kcp_quorum N: votes needed among N voters.
kcp_quorum() { echo $(($1 / 2 + 1)); }

# kcp_count_voters [EXCLUDED_INDEX...]: "voters healthy" among voters not
# excluded (learners never vote and never count).
kcp_count_voters() {
	local i voters=0 healthy=0 x skip
	for i in "${!M_ID[@]}"; do
		[[ ${M_LEARNER[i]} == true ]] && continue
		skip=false
		for x in "$@"; do [[ $x == "$i" ]] && skip=true; done
		$skip && continue
		voters=$((voters + 1))
		[[ ${M_HEALTHY[i]:-false} == true ]] && healthy=$((healthy + 1))
	done
	echo "$voters $healthy"
}

# kcp_safe_to_remove INDEX [ALREADY_REMOVED...]: a voter may go only if the
# remaining healthy voters are a quorum of the remaining voters. Learners
# are always safe.
kcp_safe_to_remove() {
	local i=$1 voters healthy
	[[ ${M_LEARNER[i]} == true ]] && return 0
	[[ ${M_HEALTHY[i]:-false} == true ]] && return 1
	read -r voters healthy <<<"$(kcp_count_voters "$@")"
	((voters > 0 && healthy >= $(kcp_quorum "$voters")))
}

# kcp_live_joins ENDPOINTS: peer URLs with a live join intent (a key under
# kcp/join/ bound to a lease of KCP_JOIN_TIMEOUT_SECONDS).
kcp_live_joins() {
	kcp_ctl "$1" get --prefix "$KCP_JOIN_PREFIX" --print-value-only 2>/dev/null
}

# kcp_remove_member ENDPOINTS INDEX REASON
kcp_remove_member() {
	kcp_log "removing member ${M_ID[$2]} (name='${M_NAME[$2]}' peers=${M_PEERS[$2]} learner=${M_LEARNER[$2]}): $3"
	kcp_ctl "$1" member remove "${M_ID[$2]}" >/dev/null ||
		kcp_die 1 "member remove ${M_ID[$2]} failed"
}

# kcp_remove_stale_learners ENDPOINTS: a learner nobody is joining with any
# more (no live join key) and whose etcd does not answer is left over from
# a failed join; it blocks every other replacement (one learner at a time).
# Returns 1 when a live join of another host is in progress.
kcp_remove_stale_learners() {
	local eps=$1 i joins
	joins=$(kcp_live_joins "$eps") || kcp_die 1 "cannot read join keys"
	for i in "${!M_ID[@]}"; do
		[[ ${M_LEARNER[i]} == true ]] || continue
		# This host's own slot is the caller's business.
		[[ -n ${M_NAME[i]} && ${M_NAME[i]} == "$KCP_MEMBER_NAME" ]] && continue
		kcp_peer_in "${M_PEERS[i]}" "$KCP_PEER_URL" && continue
		if grep -q -x -F "${M_PEERS[i]%%,*}" <<<"$joins"; then
			kcp_log "member ${M_ID[i]} (${M_PEERS[i]}) is joining right now"
			return 1
		fi
		if [[ -n ${M_CLIENTS[i]} ]] &&
			KCP_DIAL_TIMEOUT=1s kcp_ctl "${M_CLIENTS[i]}" endpoint status >/dev/null 2>&1; then
			kcp_log "learner ${M_ID[i]} (${M_PEERS[i]}) is running; leaving it to its promoter"
			return 1
		fi
		kcp_remove_member "$eps" "$i" "stale learner from an earlier failed join"
	done
	return 0
}

# kcp_join_as_learner ENDPOINTS: the locked part of every replacement:
# announce the join, add this host as a learner, and write join.env so the
# next etcd start joins the existing cluster. Caller holds the lock and has
# removed whatever held this host's slot.
kcp_join_as_learner() {
	local eps=$1 lease out cluster
	lease=$(kcp_ctl "$eps" lease grant "$KCP_JOIN_TIMEOUT_SECONDS" | awk '/granted/{print $2}')
	[[ -n $lease ]] || kcp_die 1 "cannot grant a lease for the join key"
	kcp_ctl "$eps" put --lease="$lease" "$KCP_JOIN_PREFIX$KCP_MEMBER_NAME" "$KCP_PEER_URL" >/dev/null ||
		kcp_die 1 "cannot write the join key"
	# etcd refuses an add for a few seconds after a member left ("member not
	# found", "unhealthy cluster"); a failed add may still have landed.
	local attempt
	for ((attempt = 1; attempt <= 10; attempt++)); do
		out=$(kcp_ctl "$eps" member add "$KCP_MEMBER_NAME" --learner --peer-urls="$KCP_PEER_URL" 2>&1) && break
		kcp_log "member add --learner, attempt $attempt: $(grep -v '"level"' <<<"$out" | tail -n1)"
		out=""
		sleep 2
		kcp_drop_own_unstarted_learner "$eps"
	done
	[[ -n $out ]] || kcp_die 1 "member add --learner failed $((attempt - 1)) times"
	cluster=$(sed -n 's/^ETCD_INITIAL_CLUSTER="\(.*\)"$/\1/p' <<<"$out")
	[[ -n $cluster ]] || kcp_die 1 "member add printed no ETCD_INITIAL_CLUSTER: $out"
	# shellcheck disable=SC2034 # read by etcd-spare-watch
	KCP_JOINED_MEMBER_ID=$(sed -n 's/^Member \([0-9a-f]*\) added.*/\1/p' <<<"$out")
	kcp_log "$(head -n1 <<<"$out")"
	kcp_write_join_env "$cluster"
}

# kcp_drop_own_unstarted_learner ENDPOINTS: undo a member add of this host
# whose answer was lost, so that it can be retried.
kcp_drop_own_unstarted_learner() {
	local i
	kcp_fetch_members "$1" || return 0
	for i in "${!M_ID[@]}"; do
		if [[ ${M_LEARNER[i]} == true && -z ${M_CLIENTS[i]} ]] && kcp_peer_in "${M_PEERS[i]}" "$KCP_PEER_URL"; then
			kcp_remove_member "$1" "$i" "retrying a member add whose answer was lost"
		fi
	done
}

# kcp_write_join_env INITIAL_CLUSTER: atomically, so a crash leaves the old
# file or the new one, never half of one.
kcp_write_join_env() {
	local dir tmp
	dir=$(dirname "$KCP_JOIN_ENV")
	mkdir -p "$dir"
	tmp=$(mktemp "$dir/.join.env.XXXXXX")
	printf 'ETCD_INITIAL_CLUSTER_STATE=existing\nETCD_INITIAL_CLUSTER=%s\n' "$1" >"$tmp"
	chmod 0644 "$tmp"
	mv -f "$tmp" "$KCP_JOIN_ENV"
	kcp_log "wrote $KCP_JOIN_ENV (initial cluster $1)"
}

# kcp_with_lock PROGRAM ARGS...: run PROGRAM while holding the cluster-wide
# replacement lock (a lease of KCP_LOCK_TTL_SECONDS, so a crashed holder
# frees it). etcdctl lock reports every failure of the command as exit 1,
# so the command's own status travels through a file.
kcp_with_lock() {
	local rcfile rc
	rcfile=$(mktemp)
	echo unlocked >"$rcfile"
	KCP_LOCKED_RC_FILE=$rcfile timeout --kill-after=5 "$KCP_LOCK_WAIT_SECONDS" \
		"$KCP_ETCDCTL" --endpoints="$KCP_LOCK_ENDPOINTS" --cacert="$KCP_ETCD_CA" \
		--cert="$KCP_ETCD_CERT" --key="$KCP_ETCD_KEY" --dial-timeout=2s \
		lock --ttl="$KCP_LOCK_TTL_SECONDS" "$KCP_LOCK_NAME" -- "$@" || true
	rc=$(cat "$rcfile")
	rm -f "$rcfile"
	if [[ $rc == unlocked ]]; then
		kcp_log "ERROR: could not take the replacement lock $KCP_LOCK_NAME within ${KCP_LOCK_WAIT_SECONDS}s"
		return 5
	fi
	return "$rc"
}

# kcp_require_lock WHAT: the --locked-* entry points run only under
# etcdctl lock; their exit status is handed back through KCP_LOCKED_RC_FILE.
kcp_require_lock() {
	[[ -n ${ETCD_LOCK_KEY:-} ]] || kcp_die 2 "$1 must run under 'etcdctl lock' (ETCD_LOCK_KEY unset)"
	[[ -n ${KCP_LOCKED_RC_FILE:-} ]] || kcp_die 2 "$1: KCP_LOCKED_RC_FILE unset"
	trap 'echo $? >"$KCP_LOCKED_RC_FILE"' EXIT
}
