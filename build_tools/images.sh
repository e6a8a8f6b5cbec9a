# shellcheck shell=bash
# Which image a container folder makes and how it is built, shared by build_and_push.sh (docker) and
# build_local.sh (buildah). Sourced, not run, by a script that has set `repo_root` to the repository root.
# shellcheck disable=SC2154  # repo_root: set by the sourcing script
#
# A Dockerfile that declares `ARG SERVING_IMAGE` (container-serving-optimized/) is built FROM the serving image of
# container-serving/Dockerfile, which is built first under the same tag: everything the images share has one source.

serving_container="container-serving"

# container_dir FOLDER: the container folder's absolute path, FOLDER given as a path or relative to the repository
# root; empty when there is no such folder.
container_dir() {
    if [[ -d "$1" ]]; then
        (cd "$1" && pwd)
    elif [[ -d "$repo_root/$1" ]]; then
        echo "$repo_root/$1"
    fi
}

# repository_name CONTAINER_DIR: maskrcnn-serving plus the folder's suffix after "container-serving"
# (container-serving-optimized -> maskrcnn-serving-optimized).
repository_name() {
    local folder
    folder="$(basename "$1")"
    echo "maskrcnn-serving${folder#container-serving}"
}

# build_container ENGINE CONTAINER_DIR IMAGE [FLAG...]: `ENGINE build FLAG... -f CONTAINER_DIR/Dockerfile -t IMAGE
# <repository root>` (ENGINE: docker or buildah), the serving image first when the Dockerfile is built on it.
# The builder's output goes to stderr.
build_container() {
    local engine="$1" dir="$2" image="$3"
    shift 3
    local dockerfile="$dir/Dockerfile"
    if grep -q '^ARG SERVING_IMAGE' "$dockerfile"; then
        local serving_dir="$repo_root/$serving_container"
        local serving_image
        serving_image="$(repository_name "$serving_dir"):${image##*:}"
        echo "building $serving_image first: $image is built on it" >&2
        "$engine" build "$@" -f "$serving_dir/Dockerfile" -t "$serving_image" "$repo_root" >&2
        set -- "$@" --build-arg "SERVING_IMAGE=$serving_image"
    fi
    echo "building $image from $dockerfile" >&2
    "$engine" build "$@" -f "$dockerfile" -t "$image" "$repo_root" >&2
}
