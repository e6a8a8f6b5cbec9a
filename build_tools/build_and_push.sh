#!/usr/bin/env bash
# Build a serving image and push it to Amazon ECR, creating the repository if it is missing.
#
#   build_tools/build_and_push.sh [options] REGION [TAG]
#
# Options:
#   -c, --container DIR    folder holding the Dockerfile (default: container-serving; e.g.
#                          container-serving-optimized, which starts from container-serving's image: that one is
#                          built first, under the same tag, and not pushed). The build context is the repository root.
#   -r, --repository NAME  ECR repository (default: maskrcnn-serving, plus the folder's suffix after
#                          "container-serving", e.g. maskrcnn-serving-optimized)
#   --platform P           docker build platform (default: linux/amd64, what SageMaker instances run)
#   --build-arg K=V        passed to docker build (repeatable), e.g. BASE_IMAGE=tensorflow/tensorflow:2.21.0
#   --build-only           build and tag locally; no AWS calls, no push
#   -h, --help             this help
#
# TAG defaults to `git describe --always --dirty` (the commit), else "latest".
# Needs: docker, and for pushing the AWS CLI v2 with credentials allowed to use ECR in REGION.
# The last line printed is the pushed image URI, for the notebook / `aws sagemaker create-model`.
set -euo pipefail

usage() { sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "error: $*" >&2; exit 2; }

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=build_tools/images.sh
source "$repo_root/build_tools/images.sh"
container="container-serving"
repository=""
platform="linux/amd64"
build_only=0
build_args=()

while [[ $# -gt 0 ]]; do
    case "$1" in
        -c | --container) [[ $# -ge 2 ]] || die "$1 needs a value"; container="$2"; shift 2 ;;
        -r | --repository) [[ $# -ge 2 ]] || die "$1 needs a value"; repository="$2"; shift 2 ;;
        --platform) [[ $# -ge 2 ]] || die "$1 needs a value"; platform="$2"; shift 2 ;;
        --build-arg) [[ $# -ge 2 ]] || die "$1 needs a value"; build_args+=(--build-arg "$2"); shift 2 ;;
        --build-only) build_only=1; shift ;;
        -h | --help) usage; exit 0 ;;
        --) shift; break ;;
        -*) usage >&2; die "unknown option $1" ;;
        *) break ;;
    esac
done
if [[ $# -lt 1 || $# -gt 2 ]]; then
    usage >&2
    die "expected REGION [TAG]"
fi
region="$1"
[[ "$region" =~ ^[a-z]{2}(-[a-z]+)+-[0-9]+$ ]] || die "'$region' does not look like an AWS region (e.g. us-east-1)"
tag="${2:-$(git -C "$repo_root" describe --always --dirty 2>/dev/null || echo latest)}"
[[ "$tag" =~ ^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$ ]] || die "'$tag' is not a valid image tag"

# The container folder, as given (relative to the current directory) or relative to the repository root.
container_dir="$(container_dir "$container")"
[[ -n "$container_dir" ]] || die "container folder '$container' not found"
dockerfile="$container_dir/Dockerfile"
[[ -f "$dockerfile" ]] || die "no Dockerfile in $container_dir"
if [[ -z "$repository" ]]; then
    repository="$(repository_name "$container_dir")"
fi
[[ "$repository" =~ ^[a-z0-9]+([._/-][a-z0-9]+)*$ ]] || die "'$repository' is not a valid ECR repository name"

local_image="$repository:$tag"
build_container docker "$container_dir" "$local_image" --platform "$platform" ${build_args[@]+"${build_args[@]}"}
if [[ "$build_only" -eq 1 ]]; then
    echo "$local_image"
    exit 0
fi

account="$(aws sts get-caller-identity --query Account --output text)"
domain="amazonaws.com"
[[ "$region" == cn-* ]] && domain="amazonaws.com.cn"
registry="$account.dkr.ecr.$region.$domain"

if ! aws ecr describe-repositories --region "$region" --repository-names "$repository" > /dev/null 2>&1; then
    echo "creating ECR repository $repository in $region" >&2
    aws ecr create-repository --region "$region" --repository-name "$repository" \
        --image-scanning-configuration scanOnPush=true > /dev/null
fi

aws ecr get-login-password --region "$region" | docker login --username AWS --password-stdin "$registry"

remote_image="$registry/$repository:$tag"
docker tag "$local_image" "$remote_image"
docker push "$remote_image"
echo "$remote_image"
