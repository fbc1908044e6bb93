# Shared by the bench scripts (`source "$ROOT/bench/lib.sh"`).

# install_missing COMMAND=PACKAGE ...: apt-installs the packages whose command is found
# neither on PATH nor in /usr/sbin. Needs the caller's `log`.
install_missing() {
    local missing=() pair cmd
    for pair in "$@"; do
        cmd=${pair%%=*}
        command -v "$cmd" >/dev/null || [[ -x /usr/sbin/$cmd ]] || missing+=("${pair#*=}")
    done
    ((${#missing[@]})) || return 0
    local sudo=
    ((EUID == 0)) || sudo=sudo
    log "installing ${missing[*]} (apt); the packaged services are not used by this script"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
}
