#!/usr/bin/env bash
# Set up, then show the main job, the model of containers on a pyunionfs union: a busybox image
# (from Debian's busybox-static) is imported; a container is created (Created), started (Up),
# exits with its own code (Exited (3)); what it wrote is in its own layer, listed by diff; commit
# makes an image of it, in which a new container sees the change; rm and rmi clean up.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
pyunionfs=$PWD/.venv/bin/pyunionfs

demo=$(mktemp -d /tmp/pyunionfs-demo.XXXXXX)
store="$demo/store"  # a store of its own: the machine's /var/lib/pyunionfs is left alone
trap '"$pyunionfs" --root "$store" rm -f $("$pyunionfs" --root "$store" ps -aq) >/dev/null 2>&1 || true; rm -rf "$demo"' EXIT
p() { echo "\$ pyunionfs $*" >&2; "$pyunionfs" --root "$store" "$@"; }

# A root filesystem: busybox and its applets, /etc/passwd, a motd.
mkdir -p "$demo"/rootfs/{bin,etc}
cp /bin/busybox "$demo/rootfs/bin/busybox"
for applet in $(/bin/busybox --list); do
    [ "$applet" = busybox ] || ln -s busybox "$demo/rootfs/bin/$applet"
done
printf 'root:x:0:0:root:/root:/bin/sh\n' > "$demo/rootfs/etc/passwd"
printf 'welcome to the busybox image\n' > "$demo/rootfs/etc/motd"
tar -C "$demo/rootfs" -cf "$demo/busybox.tar" .

echo "== an image: one read-only layer, unpacked once into the store"
p import --change 'CMD ["sh"]' "$demo/busybox.tar" busybox >/dev/null
p images
echo
echo "== a container: the image plus one read-write layer of its own"
id=$(p create --name demo busybox sh -c 'cat /etc/motd; echo hello > /hello.txt; rm /bin/vi; sleep 2; exit 3')
echo "$id"
p ps --all
p start demo
sleep 1
p ps
echo "(waiting for it to exit)"
while [ "$("$pyunionfs" --root "$store" ps -q)" ]; do sleep 0.2; done
p ps --all
p logs demo
echo
echo "== what it changed, in its own layer on the host (the image is untouched)"
p diff demo
ls -l "$store/containers/$id/upper"
echo
echo "== commit: a new image of the image's layer and the container's"
p commit demo busybox-hello >/dev/null
p images
p run --rm busybox-hello cat /hello.txt
echo
echo "== rm and rmi leave nothing behind"
p rm demo
p rmi busybox-hello busybox
p ps --all
p images
