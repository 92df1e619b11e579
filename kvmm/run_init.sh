#!/bin/sh
# kvmm run's init: PID 1 of a guest whose root file system is the host's / (or --root),
# read-only over virtio-9p. The kernel runs it from the host's files, at its host path
# (it ships in the kvmm package). It mounts what a command needs, runs the command that
# kvmm wrote into the run directory (a read-write 9p share, tag kvmm-run, at /run/kvmm),
# with its output on hvc0 (stdout) and hvc1 (stderr), leaves its exit status in the run
# directory and reboots; kvmm then exits with that status. See kvmm/run.py.
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PATH
run=/run/kvmm

say() { echo "kvmm run (init): $*" >/dev/console 2>/dev/null; }
end() {
    # sysrq 'b': reboot at once (reboot=k: through the i8042, which ends kvmm); without
    # sysrq, init exits and the kernel panics: kvmm reads the status all the same.
    echo b >/proc/sysrq-trigger 2>/dev/null
    exit "$1"
}

mount -t proc -o nosuid,nodev,noexec proc /proc || say "cannot mount /proc"
mount -t sysfs -o nosuid,nodev,noexec sysfs /sys || say "cannot mount /sys"
[ -c /dev/null ] || mount -t devtmpfs -o nosuid devtmpfs /dev || say "cannot mount /dev"
if [ ! -f "$run/command.sh" ]; then  # not yet mounted by a --root bootstrap
    mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /run || say "cannot mount a tmpfs on /run"
    mkdir -p "$run"
    mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 kvmm-run "$run" || { say "cannot mount the run directory"; end 1; }
fi
mkdir -p /dev/pts /dev/shm 2>/dev/null
mount -t devpts -o newinstance,ptmxmode=0666,nosuid,noexec devpts /dev/pts 2>/dev/null
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /dev/shm 2>/dev/null

# Written by kvmm: tmpfs over what needs writing, the --rw and --share mounts, the
# terminal modes of hvc0/hvc1, and KVMM_STDIN.
KVMM_STDIN=/dev/null
. "$run/setup.sh" >/dev/hvc1 2>&1

if [ "$KVMM_STDIN" = /dev/hvc0 ] && command -v setsid >/dev/null 2>&1; then
    # A terminal: hvc0 becomes the command's controlling tty (Ctrl-C reaches it).
    setsid -c -w /bin/sh "$run/command.sh" <"$KVMM_STDIN" >/dev/hvc0 2>/dev/hvc1
else
    /bin/sh "$run/command.sh" <"$KVMM_STDIN" >/dev/hvc0 2>/dev/hvc1
fi
status=$?
echo "$status" >"$run/status.tmp" && mv "$run/status.tmp" "$run/status" || say "cannot record the exit status $status"
end "$status"
