#!/bin/bash
# Builds deploy/Dockerfile on its base image pinned by tag and digest.
#
#   deploy/build_image.sh IMAGE            # from the repository root; then `docker push IMAGE`
#
# The digest comes from deploy/base-image.digest (one line, sha256:<64 hex>). When that file is
# missing, the script pulls the base tag once, records the digest the registry served, and
# asks you to commit the file: every later build, anywhere, then starts from the same bytes.
# To move to a newer base, delete the file (or edit BASE_IMAGE in the Dockerfile) and rebuild.
#
# Environment: DOCKER (default: docker), BASE_DIGEST_FILE (default: deploy/base-image.digest).
set -euo pipefail

EXIT_CONFIG=2
DOCKER="${DOCKER:-docker}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DOCKERFILE="$ROOT/deploy/Dockerfile"
BASE_DIGEST_FILE="${BASE_DIGEST_FILE:-$ROOT/deploy/base-image.digest}"

fail() {
  echo "build_image.sh: error: $*" >&2
  exit "$EXIT_CONFIG"
}

[[ $# -eq 1 && -n "$1" ]] ||
  fail "usage: deploy/build_image.sh IMAGE, e.g. us-docker.pkg.dev/PROJECT/REPO/mnist-trainer:TAG"
image="$1"

# The Dockerfile's own default, so the tag lives in one place.
base_image="$(sed -n 's/^ARG BASE_IMAGE=//p' "$DOCKERFILE")"
[[ -n "$base_image" ]] || fail "$DOCKERFILE has no 'ARG BASE_IMAGE=' line."

check_digest() {
  [[ "$1" =~ ^sha256:[0-9a-f]{64}$ ]] ||
    fail "base digest '$1' (from $2) is not sha256:<64 hex digits>."
}

if [[ -f "$BASE_DIGEST_FILE" ]]; then
  digest="$(tr -d '[:space:]' < "$BASE_DIGEST_FILE")"
  check_digest "$digest" "$BASE_DIGEST_FILE"
else
  "$DOCKER" pull "$base_image" >&2
  # RepoDigests holds NAME@sha256:...: the digest of what the registry served for the tag.
  repo_digest="$("$DOCKER" image inspect --format '{{index .RepoDigests 0}}' "$base_image")"
  digest="${repo_digest#*@}"
  check_digest "$digest" "docker image inspect $base_image"
  printf '%s\n' "$digest" > "$BASE_DIGEST_FILE"
  echo "build_image.sh: recorded $base_image@$digest in $BASE_DIGEST_FILE; commit it." >&2
fi

exec "$DOCKER" build --file "$DOCKERFILE" --build-arg "BASE_DIGEST=$digest" --tag "$image" "$ROOT"
