#!/usr/bin/env bash
# Set up, then show the main job: a small image of three layers (a busybox base, a layer that
# deletes and replaces files with both kernel and OCI whiteouts, and a config layer), merged by
# pyunionfs under a writable upper directory, listed, written to, and unmounted.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
pyunionfs=$PWD/.venv/bin/pyunionfs

demo=$(mktemp -d /tmp/pyunionfs-demo.XXXXXX)
cleanup() {
    if mountpoint -q "$demo/union"; then "$pyunionfs" umount "$demo/union"; fi
    rm -rf "$demo"
}
trap cleanup EXIT
mkdir -p "$demo"/{base,app,config,upper,work,union}

# base: busybox with a few applets, like a minimal image
mkdir -p "$demo"/base/{bin,etc,tmp}
cp /bin/busybox "$demo/base/bin/busybox"
for applet in sh ls cat echo vi; do ln -s busybox "$demo/base/bin/$applet"; done
printf 'NAME=demo-base\n' > "$demo/base/etc/os-release"
printf 'welcome to the base layer\n' > "$demo/base/etc/motd"
# app: deletes vi (kernel whiteout) and tmp (OCI whiteout), replaces the motd
mkdir -p "$demo"/app/{bin,etc}
mknod "$demo/app/bin/vi" c 0 0
touch "$demo/app/.wh.tmp"
printf 'welcome to the app layer\n' > "$demo/app/etc/motd"
# config: top layer
mkdir -p "$demo/config/etc"
printf 'demo\n' > "$demo/config/etc/hostname"

"$pyunionfs" mount --lower "$demo/config" --lower "$demo/app" --lower "$demo/base" \
    --upper "$demo/upper" --workdir "$demo/work" "$demo/union"
echo "== layers (top first): config, app, base; merged at $demo/union"
(cd "$demo/union" && find . | sort)
echo "== etc/motd comes from the app layer:"
cat "$demo/union/etc/motd"
echo "== bin/vi and tmp are deleted by whiteouts:"
ls "$demo/union/bin"
echo "== write: append to etc/motd, delete bin/cat, add etc/new"
echo "changed in the union" >> "$demo/union/etc/motd"
rm "$demo/union/bin/cat"
echo new > "$demo/union/etc/new"
cat "$demo/union/etc/motd"
echo "== the upper directory holds the changes (a copy, a char 0:0 whiteout, a new file):"
(cd "$demo/upper" && find . -mindepth 1 | sort | xargs ls -ld)
echo "== the layers are untouched:"
cat "$demo/app/etc/motd"; ls "$demo/base/bin"
echo "== mount:"
grep " $demo/union " /proc/mounts
