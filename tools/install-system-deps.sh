#!/usr/bin/env bash
# Install the system programs the tests drive, only when missing: sshd (backend), ssh, git, hg, chromium(+driver),
# haproxy (the load balancer in front of the proxy in the PROXY protocol tests).
# systemd's tools (systemd-analyze verify/security on deploy/, systemd-socket-activate), the system python3.
set -euo pipefail
need=()
command -v /usr/sbin/sshd >/dev/null 2>&1 || need+=(openssh-server)
command -v ssh >/dev/null 2>&1 || need+=(openssh-client)
command -v git >/dev/null 2>&1 || need+=(git)
command -v hg >/dev/null 2>&1 || need+=(mercurial)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v chromedriver >/dev/null 2>&1 || need+=(chromium-driver)
command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || need+=(haproxy)
{ command -v systemd-analyze && command -v systemd-socket-activate; } >/dev/null 2>&1 || need+=(systemd)
# the distribution's own Python: test_dist runs dist/kilnproxy.pyz with it (nothing else installed)
[ -x /usr/bin/python3 ] || need+=(python3)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "missing: ${need[*]}; install them (apt-get install ${need[*]}) or run as root" >&2
    exit 1
  fi
  echo "installing: ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
# sshd refuses to start without its privilege-separation directory
if [ "$(id -u)" = 0 ]; then mkdir -p /run/sshd; fi
