#!/usr/bin/env bash
# Build a serving image on this machine with buildah: no Docker daemon, no container registry.
#
#   build_tools/build_local.sh DIR        DIR: container-serving or container-serving-optimized
#
# The images' base (tensorflow/tensorflow, BASE_IMAGE of the Dockerfiles) is replaced by a local stand-in: a Debian
# root file system from debootstrap with python3, pip and the TensorFlow release pyproject.toml pins
# (build_tools/standin-base/Dockerfile). It is built once and reused until its recipe changes. DIR's Dockerfile is
# then built on it unchanged, with buildah's layer cache: the layer of the pinned dependencies is reused until
# requirements-lock.txt changes, so a code change downloads nothing.
#
# Environment:
#   EXTRA_CA_CERTS=FILE   PEM certificates to trust while building (a network behind a TLS-intercepting proxy):
#                         they go into the stand-in base only, never into the layers of DIR's Dockerfile
#   DEBIAN_MIRROR=URL     the Debian archive for debootstrap (default http://deb.debian.org/debian)
#
# Needs: root, buildah and debootstrap (Debian packages). Progress, the image's size and the build time go to stderr;
# the last line on stdout is the local image name (for `buildah from`).
set -euo pipefail

usage() { sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "error: $*" >&2; exit 2; }

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=build_tools/images.sh
source "$repo_root/build_tools/images.sh"

case "${1:-}" in
    -h | --help) usage; exit 0 ;;
    "" | -*) usage >&2; die "expected DIR (container-serving or container-serving-optimized)" ;;
esac
[[ $# -eq 1 ]] || die "expected one DIR, got $#"
dir="$(container_dir "$1")"
[[ -n "$dir" && -f "$dir/Dockerfile" ]] || die "no Dockerfile in '$1'"
[[ "$(id -u)" == 0 ]] || die "buildah and debootstrap need root here (run as root)"
for tool in buildah debootstrap; do
    command -v "$tool" > /dev/null || die "$tool is not installed (apt-get install $tool)"
done
if [[ -n "${EXTRA_CA_CERTS:-}" ]]; then
    [[ -f "$EXTRA_CA_CERTS" ]] || die "EXTRA_CA_CERTS: no file $EXTRA_CA_CERTS"
    grep -q -- '-----BEGIN CERTIFICATE-----' "$EXTRA_CA_CERTS" || die "EXTRA_CA_CERTS: no PEM certificate in it"
fi

suite="bookworm"
variant="minbase"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
tensorflow="$(sed -n 's/^ *"tensorflow==\([0-9][0-9.]*\)",*$/\1/p' "$repo_root/pyproject.toml")"
[[ -n "$tensorflow" ]] || die "no tensorflow==X pin in pyproject.toml"
standin_dir="$repo_root/build_tools/standin-base"
start=$SECONDS

# The stand-in base, named by a hash of its recipe: the root file system's parameters, the Dockerfile, the TensorFlow
# release and the extra certificates. An image of that name is reused as it is.
rootfs_key="$(printf '%s\n' "$suite" "$variant" "$mirror" | sha256sum | cut -c1-12)"
rootfs_image="localhost/maskrcnn-serving-standin-rootfs:$rootfs_key"
base_key="$( { echo "$rootfs_key" "$tensorflow"; cat "$standin_dir/Dockerfile"; cat "${EXTRA_CA_CERTS:-/dev/null}"; } \
    | sha256sum | cut -c1-12)"
base_image="localhost/maskrcnn-serving-standin-base:$base_key"

exists() { buildah inspect --type image "$1" > /dev/null 2>&1; }

if ! exists "$rootfs_image"; then
    echo "debootstrap --variant=$variant $suite ($mirror) for $rootfs_image" >&2
    work="$(mktemp -d)"
    container=""
    trap 'rm -rf "$work"; [[ -z "$container" ]] || buildah rm "$container" > /dev/null' EXIT
    debootstrap --variant="$variant" "$suite" "$work/rootfs" "$mirror" > "$work/debootstrap.log" 2>&1 \
        || { tail -20 "$work/debootstrap.log" >&2; die "debootstrap failed"; }
    container="$(buildah from scratch)"
    cp -a "$work/rootfs/." "$(buildah mount "$container")/"
    buildah umount "$container" > /dev/null
    buildah config --cmd /bin/bash --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        "$container"
    buildah commit --quiet "$container" "$rootfs_image" > /dev/null
    buildah rm "$container" > /dev/null
    container=""
    rm -rf "$work"
    trap - EXIT
fi

if ! exists "$base_image"; then
    echo "building the stand-in base $base_image (python3, pip, tensorflow==$tensorflow)" >&2
    context="$(mktemp -d)"
    trap 'rm -rf "$context"' EXIT
    mkdir "$context/extra-ca-certificates"
    if [[ -n "${EXTRA_CA_CERTS:-}" ]]; then
        cp "$EXTRA_CA_CERTS" "$context/extra-ca-certificates/extra-ca-certificates.crt"
    fi
    buildah build --isolation chroot --layers --pull=never --build-arg "ROOTFS_IMAGE=$rootfs_image" \
        --build-arg "TENSORFLOW_VERSION=$tensorflow" -f "$standin_dir/Dockerfile" -t "$base_image" "$context" >&2
    rm -rf "$context"
    trap - EXIT
fi

image="localhost/$(repository_name "$dir"):local"
build_container buildah "$dir" "$image" --isolation chroot --layers --pull=never \
    --build-arg "BASE_IMAGE=$base_image"

size="$(buildah images --noheading --format '{{.Size}}' "$image")"
echo "built $image on $base_image in $((SECONDS - start)) s; size: $size" >&2
echo "$image"
