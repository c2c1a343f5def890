#!/bin/busybox sh
# /init of the CRX test host's L1 (busybox-static in an initramfs built by build-l1.sh).
#
# Loads the boot modules (virtio, 9p, overlay, kvm_amd), brings up eth0 on QEMU's user network,
# mounts the host's root (9p, read-only) under a tmpfs overlay as the new root, mounts the host's
# writable shares (9p) at their own paths, and switch_roots into the agent named in the run dir's
# l1.conf (the kernel command line's crx.run= gives that run dir).
/bin/busybox mkdir -p /proc /sys /dev /sbin /usr/bin /usr/sbin
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sys /sys
/bin/busybox mount -t devtmpfs dev /dev
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
exec </dev/null >/dev/console 2>&1

log() { echo "crx-testhost init [$(cut -d' ' -f1 /proc/uptime)s]: $*"; }
fail() { log "FATAL: $*"; sleep 1; poweroff -f; }

while read -r m; do insmod "/$m" || fail "insmod $m"; done </modules.order
[ -c /dev/kvm ] || fail "/dev/kvm is missing after loading kvm_amd"
log "modules loaded; kvm_amd npt=$(cat /sys/module/kvm_amd/parameters/npt) nested=$(cat /sys/module/kvm_amd/parameters/nested)"
# Guest RAM is a memfd that asks for huge pages (MADV_HUGEPAGE): let shmem honour that.
echo advise >/sys/kernel/mm/transparent_hugepage/shmem_enabled || log "shmem THP stays off"

ip link set lo up
ip link set eth0 up || fail "no eth0"
ip addr add 10.0.2.15/24 dev eth0
ip route add default via 10.0.2.2

run=
for word in $(cat /proc/cmdline); do
    case $word in crx.run=*) run=${word#crx.run=} ;; esac
done
[ -n "$run" ] || fail "no crx.run= on the kernel command line"

mkdir -p /lower /upper /newroot
mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=512000 hostroot /lower ||
    fail "cannot mount the host root (9p tag hostroot)"
[ -f "/lower$run/l1.conf" ] || fail "no $run/l1.conf"
# Sets AGENT, AGENT_ARGS, RW_SHARES ("tag=path ..."), MODULES_DIR, EXTRA_MODULES.
. "/lower$run/l1.conf"

mount -t tmpfs -o mode=755 upper /upper
mkdir -p /upper/data /upper/work
mount -t overlay -o lowerdir=/lower,upperdir=/upper/data,workdir=/upper/work overlay /newroot ||
    fail "cannot mount the overlay root"

n=/newroot
mount -t proc proc $n/proc
mount -t sysfs sys $n/sys
mount -t cgroup2 cgroup2 $n/sys/fs/cgroup 2>/dev/null || log "no cgroup2 at /sys/fs/cgroup"
mount -t devtmpfs dev $n/dev
mkdir -p $n/dev/pts $n/dev/shm
mount -t devpts -o newinstance,ptmxmode=0666 devpts $n/dev/pts
mount -t tmpfs -o mode=1777 shm $n/dev/shm
mount -t tmpfs -o mode=755 run $n/run
for share in $RW_SHARES; do
    tag=${share%%=*}
    path=${share#*=}
    mkdir -p "$n$path"
    mount -t 9p -o trans=virtio,version=9p2000.L,cache=mmap,msize=512000 "$tag" "$n$path" ||
        fail "cannot mount the writable share $path (9p tag $tag)"
done

release=$(uname -r)
mkdir -p "$n/lib/modules/$release"
mount --bind "$n$MODULES_DIR" "$n/lib/modules/$release"
if [ -n "$EXTRA_MODULES" ]; then
    chroot $n modprobe -a $EXTRA_MODULES || log "modprobe of some of: $EXTRA_MODULES failed"
fi
# Enable the static keys of the tc ingress path and of br_netfilter's hooks while one CPU is
# online, as the agent does KVM's before it brings the others online (see its static_keys.rs): a
# pod's tc redirect and its CNI bridge would otherwise make the L1 rewrite its code under a running
# CPU each time a pod comes and goes (a bridge in a netns registers br_netfilter's hooks there).
{ chroot $n /sbin/ip link add crx-keys-br type bridge &&
    chroot $n /sbin/ip link add crx-keys0 type veth peer name crx-keys1 &&
    chroot $n /sbin/tc qdisc add dev crx-keys0 ingress &&
    chroot $n /sbin/tc filter add dev crx-keys0 ingress protocol all u32 match u32 0 0 action pass; } ||
    log "cannot enable the tc and br_netfilter static keys"

rm -f $n/etc/resolv.conf
echo "nameserver 10.0.2.3" >$n/etc/resolv.conf
hostname crx-testhost
# Warnings and the stacks a soft lockup dumps (every CPU's) reach serial.log, which hang reports
# quote; info messages (bridges, veths) stay off the slow emulated serial port.
echo 5 >/proc/sys/kernel/printk
echo 1 >/proc/sys/kernel/softlockup_all_cpu_backtrace

log "switching root to the agent $AGENT"
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
exec switch_root $n "$AGENT" $AGENT_ARGS
