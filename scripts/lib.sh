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
    local wanted=(libssl-dev pkg-config postgresql-client curl python3)
    local missing=()
    for package in "${wanted[@]}"; do
        dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
    done
    if ((${#missing[@]})); then
        log "installing Debian packages: ${missing[*]}"
        apt-get update -qq >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2
    fi
    command -v cargo >/dev/null || die "cargo is not installed: install the Rust toolchain with rustup"
}

# Starts the local PostgreSQL cluster when it is installed but not answering.
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

# Waits until an HTTP URL answers 200, or fails after the given seconds (default 30).
wait_for_http() {
    local url=$1 seconds=${2:-30}
    for _ in $(seq 1 $((seconds * 10))); do
        if curl -fsS -o /dev/null "$url" 2>/dev/null; then
            return
        fi
        sleep 0.1
    done
    die "$url did not answer within ${seconds}s"
}
