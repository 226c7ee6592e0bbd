#!/usr/bin/env bash
# Set up, then show the main job: a tiny image of three layers built from Debian's busybox-static
# (a busybox base, a layer that deletes and replaces files with a kernel and an OCI whiteout, and
# a config layer), run as a container on a pyunionfs union: the command writes and deletes, the
# changes land in the upper directory, and the image is untouched.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
pyunionfs=$PWD/.venv/bin/pyunionfs

demo=$(mktemp -d /tmp/pyunionfs-demo.XXXXXX)
trap 'rm -rf "$demo"' EXIT
mkdir -p "$demo"/{base,app,config,upper,work}

# base: busybox and its applets, like a minimal image
mkdir -p "$demo"/base/{bin,etc}
cp /bin/busybox "$demo/base/bin/busybox"
for applet in $(/bin/busybox --list); do
    [ "$applet" = busybox ] || ln -s busybox "$demo/base/bin/$applet"
done
printf 'root:x:0:0:root:/root:/bin/sh\n' > "$demo/base/etc/passwd"
printf 'welcome to the base layer\n' > "$demo/base/etc/motd"
printf 'NAME=demo\n' > "$demo/base/etc/os-release"
# app: deletes vi (kernel whiteout) and os-release (OCI whiteout), replaces the motd
mkdir -p "$demo"/app/{bin,etc}
mknod "$demo/app/bin/vi" c 0 0
touch "$demo/app/etc/.wh.os-release"
printf 'welcome to the app layer\n' > "$demo/app/etc/motd"
# config: the top layer
mkdir -p "$demo/config/etc"
printf 'from the config layer\n' > "$demo/config/etc/app.conf"

echo "== pyunionfs run: a container on the union of config, app and base"
code=0
"$pyunionfs" run --lower "$demo/config" --lower "$demo/app" --lower "$demo/base" \
    --upper "$demo/upper" --workdir "$demo/work" --hostname demo -- sh -c '
        echo "hostname $(hostname), my PID $$, $(ls /bin | wc -l) programs in /bin"
        cat /etc/motd /etc/app.conf
        ls /bin/vi /etc/os-release 2>&1 | sed "s/^/deleted by a whiteout: /"
        echo "changed in the container" >> /etc/motd
        rm /bin/cat
        echo new > /etc/new
        exit 7' || code=$?
echo "== the container exited with $code, its own exit code"
echo "== the upper directory holds the changes (a copy, a char 0:0 whiteout, a new file):"
(cd "$demo/upper" && find bin/cat etc -maxdepth 1 | sort | xargs ls -ld)
echo "== the image is untouched:"
cat "$demo/app/etc/motd"
ls -l "$demo/base/bin/cat"
