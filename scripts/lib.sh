# Shell helpers shared by scripts/demo, scripts/test and scripts/bench. Source it; every
# function logs to stderr so a script's stdout stays its own.

log() {
    printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2
}

die() {
    log "error: $*"
    exit 1
}

# Installs the Debian packages the build and the scripts need, when one is missing.
ensure_build_packages() {
    # Each command, and the Debian package that provides it.
    local -A providers=([pkg-config]=pkg-config [psql]=postgresql-client [pg_isready]=postgresql-client
                        [pgbench]=postgresql-contrib [curl]=curl [python3]=python3 [cc]=gcc)
    local missing=() command
    for command in "${!providers[@]}"; do
        command -v "$command" >/dev/null || missing+=("${providers[$command]}")
    done
    # OpenSSL headers for the TLS of the HTTP client.
    [[ -f /usr/include/openssl/ssl.h ]] || missing+=(libssl-dev)
    if ((${#missing[@]})); then
        mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
        log "installing Debian packages: ${missing[*]}"
        apt-get update -qq >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2
    fi
    command -v cargo >/dev/null || die "cargo is not installed: install the Rust toolchain with rustup"
}

# Starts the local PostgreSQL cluster when it is installed but not accepting connections.
ensure_postgres() {
    if pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; then
        return
    fi
    local version
    version=$(ls /etc/postgresql 2>/dev/null | sort -V | tail -1)
    [[ -n "$version" ]] || die "PostgreSQL is not installed (no /etc/postgresql); install postgresql"
    log "starting PostgreSQL $version"
    pg_ctlcluster --skip-systemctl-redirect "$version" main start >&2
    for _ in $(seq 1 60); do
        pg_isready -h 127.0.0.1 -p 5432 -q && return
        sleep 0.5
    done
    die "PostgreSQL did not start on 127.0.0.1:5432"
}

# Starts the local RabbitMQ node when it is installed but not running.
ensure_rabbitmq() {
    if rabbitmqctl -q status >/dev/null 2>&1; then
        return
    fi
    command -v rabbitmq-server >/dev/null || die "RabbitMQ is not installed; install rabbitmq-server"
    log "starting RabbitMQ"
    rabbitmq-server -detached >&2
    rabbitmqctl -q await_startup >&2 || die "RabbitMQ did not start"
}

# Drops and recreates a database on the local server.
recreate_database() {
    local name=$1
    psql -h 127.0.0.1 -U postgres -q -v ON_ERROR_STOP=1 \
        -c "DROP DATABASE IF EXISTS \"$name\" WITH (FORCE)" -c "CREATE DATABASE \"$name\"" >&2
}

# Waits until an HTTP URL returns 200, or fails after the given seconds (default 30).
wait_for_http() {
    local url=$1 seconds=${2:-30}
    for _ in $(seq 1 $((seconds * 10))); do
        if curl -fsS -o /dev/null "$url" 2>/dev/null; then
            return
        fi
        sleep 0.1
    done
    die "$url did not return 200 within ${seconds}s"
}

# Prints the first TCP port from the given one upward on which nothing listens on
# 127.0.0.1. A port can still be taken between this check and its use. A service then
# fails to bind and logs the error.
free_port() {
    local port=$1
    while (echo >"/dev/tcp/127.0.0.1/$port") 2>/dev/null; do
        port=$((port + 1))
    done
    echo "$port"
}

# Deletes every RabbitMQ queue whose name starts with "PREFIX.", so a run does not
# consume messages a previous run left behind for a database that no longer exists.
delete_amqp_queues() {
    local prefix=$1 queue queues
    # Read every name first: rabbitmqctl reads standard input, which would swallow
    # the rest of a `while read` loop's input.
    mapfile -t queues < <(rabbitmqctl -q list_queues --no-table-headers name </dev/null)
    for queue in "${queues[@]}"; do
        [[ "$queue" == "$prefix".* ]] || continue
        rabbitmqctl -q delete_queue "$queue" </dev/null >/dev/null
    done
}

# Processes started by start_background, in start order.
STARTED_NAMES=()
declare -A STARTED_PIDS=() STARTED_LOGS=()

# Starts a command in the background with its output in a log file:
#   start_background NAME LOGFILE COMMAND [ARGS...]
# Use `env VAR=value command` to give it its own variables.
start_background() {
    local name=$1 logfile=$2
    shift 2
    "$@" >"$logfile" 2>&1 &
    STARTED_NAMES+=("$name")
    STARTED_PIDS[$name]=$!
    STARTED_LOGS[$name]=$logfile
    log "started $name (pid $!, log $logfile)"
}

# Waits until a started process returns 200 on URL, failing early with the end of its
# log when it exits first: wait_for_service NAME URL [SECONDS, default 60].
wait_for_service() {
    local name=$1 url=$2 seconds=${3:-60}
    local pid=${STARTED_PIDS[$name]}
    for _ in $(seq 1 $((seconds * 10))); do
        if ! kill -0 "$pid" 2>/dev/null; then
            tail -n 20 "${STARTED_LOGS[$name]}" >&2 || true
            die "$name exited before it was ready; its log is ${STARTED_LOGS[$name]}"
        fi
        if curl -fsS -o /dev/null "$url" 2>/dev/null; then
            log "$name is ready"
            return
        fi
        sleep 0.1
    done
    die "$name did not return 200 on $url within ${seconds}s; its log is ${STARTED_LOGS[$name]}"
}

# Stops every started process, last started first: SIGTERM, then SIGKILL after
# REACH_STOP_TIMEOUT_SECONDS (default 30). Meant for `trap stop_started EXIT`.
stop_started() {
    local index
    for ((index = ${#STARTED_NAMES[@]} - 1; index >= 0; index--)); do
        stop_background "${STARTED_NAMES[$index]}"
    done
    STARTED_NAMES=()
}

# Removes a process started by start_background from the started list, so
# stop_started leaves it alone: untrack_background NAME.
untrack_background() {
    local name=$1 kept=() started
    for started in "${STARTED_NAMES[@]}"; do
        [[ "$started" == "$name" ]] || kept+=("$started")
    done
    STARTED_NAMES=("${kept[@]}")
    unset "STARTED_PIDS[$name]" "STARTED_LOGS[$name]"
}

# Stops one process started by start_background the way stop_started does (SIGTERM,
# then SIGKILL after REACH_STOP_TIMEOUT_SECONDS) and untracks it: stop_background NAME.
stop_background() {
    local name=$1 pid status=0
    pid=${STARTED_PIDS[$name]:-}
    [[ -n "$pid" ]] || return 0
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 1 $((${REACH_STOP_TIMEOUT_SECONDS:-30} * 10))); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            log "$name did not stop after SIGTERM; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    wait "$pid" 2>/dev/null || status=$?
    log "stopped $name (exit status $status)"
    untrack_background "$name"
}

# Waits until a process started by start_background exits by itself, untracks it and
# returns its exit status: wait_background NAME.
wait_background() {
    local name=$1 pid status=0
    pid=${STARTED_PIDS[$name]}
    wait "$pid" || status=$?
    log "$name exited (exit status $status)"
    untrack_background "$name"
    return "$status"
}
