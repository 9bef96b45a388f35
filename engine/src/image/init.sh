#!/bin/busybox sh
# runner's initramfs: load the disk and ext4 modules, mount the root disk, and hand over to
# qemu-guest-agent (under tini, which reaps orphans). No systemd: a job VM needs the agent
# and nothing else, and every process started under TCG costs boot time.
B=/bin/busybox
fail() { echo "runner-init: $*" >/dev/console; $B poweroff -f; }
$B mount -t devtmpfs dev /dev
$B mount -t proc proc /proc
for m in $($B cat /modules.order); do
  $B insmod "/lib/modules/$m.ko" || fail "cannot load kernel module $m"
done
i=0
while [ ! -b /dev/vda ]; do
  i=$((i + 1))
  [ $i -gt 1000 ] && fail "no root disk (/dev/vda) after 10 s"
  $B usleep 10000
done
$B mount -t ext4 -o rw,noatime /dev/vda /newroot || fail "cannot mount the root disk /dev/vda"
$B mount --move /dev /newroot/dev
$B mount --move /proc /newroot/proc
$B mount -t sysfs sys /newroot/sys
$B mount -t tmpfs -o mode=0755,nosuid,nodev run /newroot/run
$B mount -t tmpfs -o mode=1777,nosuid,nodev tmp /newroot/tmp
$B mkdir -p /newroot/dev/pts /newroot/dev/shm /newroot/dev/virtio-ports /newroot/run/qemu-ga
$B mount -t devpts -o gid=5,mode=620 devpts /newroot/dev/pts
$B mount -t tmpfs -o mode=1777,nosuid,nodev shm /newroot/dev/shm
# udev is not running: name the virtio-serial ports ourselves, as udev would. Where
# virtio_console is a module (bookworm kernels), its ports appear a moment after loading it.
ports() { $B cat /newroot/sys/class/virtio-ports/*/name 2>/dev/null; }
i=0
until ports | $B grep -qx org.qemu.guest_agent.0 && ports | $B grep -qx org.runner.output.0; do
  i=$((i + 1))
  [ $i -gt 1000 ] && fail "no virtio-serial ports for the agent and the output after 10 s"
  $B usleep 10000
done
for p in /newroot/sys/class/virtio-ports/*; do
  read -r name < "$p/name" && $B ln -sf "../${p##*/}" "/newroot/dev/virtio-ports/$name"
done
$B hostname runner
exec $B switch_root /newroot /usr/bin/tini-static -s -- \
  /usr/sbin/qemu-ga -m virtio-serial -p /dev/virtio-ports/org.qemu.guest_agent.0 -t /run/qemu-ga
