#!/usr/bin/env bash
# Build kvmm's guest kernel (vmlinux and bzImage) from Debian's linux-source-6.1.
#
# The result is cached under ${KVMM_CACHE:-~/.cache/kvmm}/kernel-<key>/, where <key>
# hashes the source package version, config.fragment and the recipe number below, so a second run
# with the same inputs is instant. Prints the cache directory on stdout (last line).
#
# A build shows its progress on stderr: the phase (unpack, configure, compile, link),
# objects compiled of the total (the list `make -n` gives once the tree is configured),
# the elapsed time and an estimate of what is left, updated every 2 s on a terminal and
# one line per phase elsewhere (CI logs). The full make output goes to
# <cache>/kernel-<key>.log, whose last lines are shown if the build fails.
#
# Usage: kernels/build.sh [--print-dir]   (--print-dir: print the cache dir, build nothing)
# KVMM_KERNEL_TARBALL names another source tarball (tests/test_kernel_build.py builds a
# fake one); it then takes part in the key.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${KVMM_CACHE:-$HOME/.cache/kvmm}
tarball=${KVMM_KERNEL_TARBALL:-/usr/src/linux-source-6.1.tar.xz}

"$here/../scripts/ensure-packages.sh" linux-source-6.1 build-essential flex bison bc libelf-dev libssl-dev xz-utils

# Bump when the build steps below change what they produce.
recipe=1
src_version=$(dpkg-query -W -f '${Version}' linux-source-6.1)
key_line="$src_version recipe=$recipe"
[ -z "${KVMM_KERNEL_TARBALL:-}" ] || key_line="$key_line source=$tarball"
key=$( { echo "$key_line"; cat "$here/config.fragment"; } | sha256sum | cut -c1-16)
out="$cache/kernel-$key"
if [ "${1:-}" = "--print-dir" ]; then echo "$out"; exit 0; fi
if [ -f "$out/vmlinux" ] && [ -f "$out/bzImage" ]; then
    echo "kernels/build.sh: cached kernel $out (linux-source $src_version)" >&2
    echo "$out"; exit 0
fi

mkdir -p "$cache"
# One build at a time per cache: a second caller waits, then finds the result.
exec 9>"$cache/build.lock"
if ! flock -n 9; then
    echo "kernels/build.sh: another build is using $cache; waiting for it to finish" >&2
    flock 9
fi
if [ -f "$out/vmlinux" ] && [ -f "$out/bzImage" ]; then echo "$out"; exit 0; fi

# --- progress --------------------------------------------------------------------------
log="$cache/kernel-$key.log"
: >"$log"
tty=false
[ -t 2 ] && tty=true
status_shown=false
job=""  # the running phase's background process
phase_start=$SECONDS

mmss() { printf '%d:%02d' $(($1 / 60)) $(($1 % 60)); }

# A finished line (on a terminal, it replaces the status line).
say() {
    if $status_shown; then printf '\r\033[K' >&2; status_shown=false; fi
    printf '%s\n' "$*" >&2
}

# The status line, rewritten in place (terminal only), cut to the terminal's width so
# that \r always returns to its start.
status() {
    $tty || return 0
    local cols=${COLUMNS:-$(tput cols 2>/dev/null || echo 80)}
    local text="$* "
    printf '\r\033[K%s' "${text:0:$((cols - 1))}" >&2
    status_shown=true
}

# Objects compiled so far for vmlinux (make's "  CC  path.o" / "  AS  path.o" lines before
# it links vmlinux.o; the boot code compiled for bzImage afterwards belongs to the link).
compiled() { awk '/^  LD      vmlinux\.o$/ { exit } /^  (CC|AS)      / { n++ } END { print n + 0 }' "$log"; }

linking() { grep -q '^  LD      vmlinux\.o$' "$log"; }

# Percent of the tarball read so far by tar's xz (they share tar's stdin offset).
unpacked() {
    local pos
    pos=$(awk '/^pos:/ { print $2 }' "/proc/$job/fdinfo/0" 2>/dev/null) || pos=""
    [ -n "$pos" ] && echo $((pos * 100 / tar_size)) || echo ""
}

# Run "$@" as the current phase's job, its output to the log; every 2 s call the
# phase's progress function (a terminal sees it). Exits with the job's status.
run_job() {
    local progress=$1; shift
    "$@" <&0 >>"$log" 2>&1 &  # <&0: a background job's stdin is /dev/null unless redirected
    job=$!
    local last=-2
    while kill -0 "$job" 2>/dev/null; do
        if [ $((SECONDS - last)) -ge 2 ]; then "$progress"; last=$SECONDS; fi
        sleep 0.5
    done
    local rc=0
    wait "$job" || rc=$?
    job=""
    return $rc
}

fail() {
    say "kernels/build.sh: $1 failed after $(mmss $SECONDS); the last lines of $log:"
    tail -n 25 "$log" >&2
    exit 1
}

work=$(mktemp -d "$cache/build-$key.XXXXXX")
cleanup() {
    local rc=$?
    if [ -n "$job" ]; then kill "$job" 2>/dev/null || true; wait "$job" 2>/dev/null || true; fi
    $status_shown && printf '\n' >&2
    # Removing a half-built tree can take a while on a busy disk: say why we are still here.
    [ "$rc" = 0 ] || echo "kernels/build.sh: removing the unfinished build tree $work" >&2
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 129' HUP  # the terminal closed: still remove the work tree (1.3 GB)
trap 'exit 130' INT
trap 'exit 143' TERM
SECONDS=0

say "kernels/build.sh: building Linux $src_version for kvmm, 5-9 minutes on 2 cores"
say "kernels/build.sh: full log in $log"

# [1/4] unpack
tar_size=$(stat -c %s "$tarball")
$tty || say "kernels/build.sh: [1/4] unpack"
phase_start=$SECONDS
unpack_progress() {
    local pct; pct=$(unpacked)
    status "  [1/4] unpack     ${pct:+$pct% of the source read, }$(mmss $SECONDS) elapsed"
}
run_job unpack_progress tar -C "$work" -xJf - <"$tarball" || fail "unpacking $tarball"
$tty && say "  [1/4] unpack     done in $(mmss $((SECONDS - phase_start)))"

# [2/4] configure
cd "$work"/linux-source-6.1
$tty || say "kernels/build.sh: [2/4] configure ($(mmss $SECONDS))"
phase_start=$SECONDS
configure_progress() { status "  [2/4] configure  tinyconfig + config.fragment, $(mmss $SECONDS) elapsed"; }
configure() {
    make tinyconfig
    scripts/kconfig/merge_config.sh -m .config "$here/config.fragment"
    make olddefconfig
}
run_job configure_progress configure || fail "configure"
# Every option the fragment asks for must have survived olddefconfig (a missing
# dependency silently drops an option otherwise).
bad=0
while IFS= read -r line; do
    case "$line" in CONFIG_*=n) opt=${line%%=*}
            grep -qx "$opt=y" .config && { say "kernels/build.sh: $opt is still set"; bad=1; } ;;
        CONFIG_*) grep -qx "$line" .config || { say "kernels/build.sh: $line did not stick"; bad=1; } ;;
    esac
done < "$here/config.fragment"
[ $bad = 0 ] || exit 1
# The objects make will compile for vmlinux: the "  CC  path.o" lines of a dry run, which
# sub-makes print without compiling (about 10 s); 0 if it lists none.
list_objects() {
    { make -n vmlinux 2>/dev/null || true; } | { grep -oE "echo '  (CC|AS)      [^']*'" || true; } | sort -u >"$work/objects"
}
listing_progress() { status "  [2/4] configure  listing the objects to compile, $(mmss $SECONDS) elapsed"; }
run_job listing_progress list_objects || true
total=$(wc -l <"$work/objects" 2>/dev/null || echo 0)
$tty && say "  [2/4] configure  done in $(mmss $((SECONDS - phase_start))), $total objects to compile"

# [3/4] compile and [4/4] link: one make, told apart by its log.
expect=""
[ "$total" -gt 0 ] && expect=": $total objects"
$tty || say "kernels/build.sh: [3/4] compile$expect ($(mmss $SECONDS))"
phase_start=$SECONDS
link_start=""
build_progress() {
    local n; n=$(compiled)
    if [ -z "$link_start" ] && linking; then
        link_start=$SECONDS
        if $tty; then
            say "  [3/4] compile    $n objects in $(mmss $((SECONDS - phase_start)))"
        else
            say "kernels/build.sh: [4/4] link ($(mmss $SECONDS))"
        fi
    fi
    if [ -n "$link_start" ]; then
        local step; step=$( { grep -E '^  [A-Z]+ ' "$log" || true; } | tail -n 1 | awk '{ print $1, $2 }')
        status "  [4/4] link       ${step:+$step, }$(mmss $SECONDS) elapsed"
        return
    fi
    local figure="$n objects" left=""
    if [ "$total" -gt 0 ]; then
        figure="$n/$total objects ($((n * 100 / total))%)"
        local spent=$((SECONDS - phase_start))
        # After a twentieth of the objects, the rate so far says what is left.
        if [ "$n" -ge $((total / 20)) ] && [ "$n" -gt 0 ] && [ "$n" -lt "$total" ]; then
            left=", about $(mmss $((spent * (total - n) / n))) left"
        fi
    fi
    status "  [3/4] compile    $figure, $(mmss $SECONDS) elapsed$left"
}
run_job build_progress make -j"$(nproc)" vmlinux bzImage || fail "make vmlinux bzImage"
[ -n "$link_start" ] || build_progress  # a link shorter than one update
$tty && say "  [4/4] link       done in $(mmss $((SECONDS - link_start)))"

tmp_out=$(mktemp -d "$cache/out-$key.XXXXXX")
cp vmlinux "$tmp_out/vmlinux"
cp arch/x86/boot/bzImage "$tmp_out/bzImage"
cp .config "$tmp_out/config"
echo "$src_version" > "$tmp_out/source-version"
rm -rf "$out"; mv "$tmp_out" "$out"
say "kernels/build.sh: built $out in $(mmss $SECONDS)"
echo "$out"
