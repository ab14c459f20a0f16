#!/usr/bin/env bash
# Proves the README's "two commands for a fresh machine" on a machine that cannot be a used one: builds a minimal
# Debian 12 root from Debian's packages (mmdebstrap --variant=minbase bookworm), copies a clean clone of this
# repository's committed HEAD into it (not the working tree) and runs the commands there with chroot, as root,
# exactly as the README has them. CUDA is off (the root has no nvcc; MLA_WITH_CUDA=OFF as well).
#
#   scripts/fresh-root-check.sh [demo] [test]      (default: both, demo first, in the same clone)
#
# Needs root (mmdebstrap, mount, chroot) and a Debian-like host with apt; installs mmdebstrap when missing.
# Network: Debian's mirrors (the bootstrap and setup.sh's apt-get) and PyPI (python-tests.sh's pip).
# The host's apt proxy settings (Acquire::*::Proxy in /etc/apt/apt.conf*) go to the bootstrap and into the root;
# http_proxy/https_proxy/no_proxy (either case) and PIP_INDEX_URL/PIP_EXTRA_INDEX_URL are passed to the commands.
# Nothing else of the host's environment is. MLA_FRESH_MIRROR=URL picks another Debian mirror,
# MLA_FRESH_TMPDIR the parent folder of the root (default $TMPDIR or /var/tmp), MLA_FRESH_KEEP=1 keeps the root.
# Unmounts and deletes the root on every exit, failure and Ctrl-C included. Exits non-zero when any phase fails;
# prints how long each phase took.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cmds=("$@")
[ ${#cmds[@]} -gt 0 ] || cmds=(demo test)
for c in "${cmds[@]}"; do
  case $c in demo | test) ;; *) echo "usage: $0 [demo] [test]" >&2; exit 2 ;; esac
done
if [ "$(id -u)" != 0 ]; then
  echo "fresh-root-check: needs root (mmdebstrap, mount, chroot)" >&2
  exit 2
fi
# A private mount namespace: the root's mounts are invisible to the host and go away with this process even if it
# is killed outright; the trap below unmounts them in order anyway.
if [ -z "${MLA_FRESH_NS:-}" ] && command -v unshare >/dev/null; then
  exec env MLA_FRESH_NS=1 unshare --mount --propagation private -- bash "$0" "$@"
fi

phases=()
phase_start=0
phase_name=""
start_phase() { phase_name=$1; phase_start=$(date +%s); echo "fresh-root: == $1"; }
end_phase() {
  local took=$(( $(date +%s) - phase_start ))
  phases+=("$(printf '%-34s %5d s  %s' "$phase_name" "$took" "$1")")
  echo "fresh-root: $phase_name: $1 after $took s"
  phase_name=""
}

work=""
root=""
mounts=()
child=""
# Long steps run in the background and are waited for, so that a TERM or INT reaches the trap at once (bash runs
# traps only between foreground commands); the trap ends the step.
run() { "$@" & child=$!; wait "$child"; local rc=$?; child=""; return $rc; }
t_all=$(date +%s)
cleanup() {
  local rc=$?
  set +e
  [ -n "$child" ] && kill "$child" 2>/dev/null && wait "$child" 2>/dev/null
  [ -n "$phase_name" ] && end_phase "FAILED (rc $rc)"
  if [ -n "$root" ] && [ -d "$root" ]; then
    # Processes left in the root (an interrupted run): those whose root directory is ours, by id.
    for p in /proc/[0-9]*; do
      [ "$(readlink "$p/root" 2>/dev/null)" = "$root" ] && kill -9 "${p#/proc/}" 2>/dev/null
    done
    for ((i = ${#mounts[@]} - 1; i >= 0; i--)); do
      umount "${mounts[i]}" 2>/dev/null || umount -l "${mounts[i]}" || echo "fresh-root: cannot unmount ${mounts[i]}"
    done
  fi
  if [ -n "$work" ] && [ -d "$work" ]; then
    if awk -v r="$work" '$5 == r || index($5, r "/") == 1 { found = 1 } END { exit !found }' /proc/self/mountinfo; then
      echo "fresh-root: something is still mounted under $work; leaving it in place"
    elif [ "${MLA_FRESH_KEEP:-0}" = 1 ]; then
      echo "fresh-root: kept $root (MLA_FRESH_KEEP=1)"
    else
      rm -rf --one-file-system "$work"
    fi
  fi
  echo "fresh-root: phases"
  for p in "${phases[@]}"; do echo "  $p"; done
  echo "fresh-root: total $(( $(date +%s) - t_all )) s, $([ $rc = 0 ] && echo passed || echo "FAILED (rc $rc)")"
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# The commit to prove: the repository's HEAD, as committed.
sha=$(git -C "$here" rev-parse HEAD)
if [ -n "$(git -C "$here" status --porcelain --untracked-files=no)" ]; then
  echo "fresh-root: note: uncommitted changes in $here are not part of the check (it clones HEAD $sha)"
fi

if ! command -v mmdebstrap >/dev/null; then
  start_phase "install mmdebstrap on the host"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends mmdebstrap >/dev/null
  end_phase ok
fi

# The host's apt proxy settings, as apt reads them (apt.conf and apt.conf.d); mmdebstrap uses them for the
# bootstrap and writes them into the root's /etc/apt/apt.conf.d/99mmdebstrap, so setup.sh's apt-get uses them too.
aptopts=()
while IFS= read -r line; do
  aptopts+=("--aptopt=$line")
done < <(apt-config dump 2>/dev/null | grep -E '^Acquire::[a-z]+::Proxy(::[^ ]+)? "[^"]' || true)
# Proxies and package indexes for the commands in the root; nothing else of the host's environment.
envs=(PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root MLA_WITH_CUDA=OFF)
for v in http_proxy https_proxy no_proxy HTTP_PROXY HTTPS_PROXY NO_PROXY PIP_INDEX_URL PIP_EXTRA_INDEX_URL; do
  [ -n "${!v:-}" ] && envs+=("$v=${!v}")
done
[ ${#aptopts[@]} -gt 0 ] && echo "fresh-root: apt proxy settings from the host: ${aptopts[*]#--aptopt=}"

parent=${MLA_FRESH_TMPDIR:-${TMPDIR:-/var/tmp}}
mkdir -p "$parent"
work=$(mktemp -d "$parent/mla-fresh-root.XXXXXX")
chmod 755 "$work"  # apt's download sandbox user (_apt) reads the root's lists/partial through it
root=$work/root

start_phase "bootstrap Debian 12 minbase"
run mmdebstrap --variant=minbase --mode=root "${aptopts[@]}" bookworm "$root" ${MLA_FRESH_MIRROR:+"$MLA_FRESH_MIRROR"}
echo "fresh-root: $(chroot "$root" dpkg-query -W -f='.\n' | wc -l) packages in the root"
end_phase ok

start_phase "clean clone of $(git -C "$here" rev-parse --short HEAD)"
git clone -q --no-hardlinks --no-checkout "$here" "$root/root/mla"
git -C "$root/root/mla" checkout -q --detach "$sha"
echo "fresh-root: /root/mla at $(git -C "$root/root/mla" log -1 --format='%h %s')"
end_phase ok

# What a booted machine has: /proc, /sys, /dev (with /dev/pts and /dev/shm), and a resolver configuration.
mount -t proc proc "$root/proc" && mounts+=("$root/proc")
mount -t sysfs sysfs "$root/sys" && mounts+=("$root/sys")
mount --bind /dev "$root/dev" && mounts+=("$root/dev")
mount --make-private "$root/dev"  # what is mounted under it below must not reach the host's /dev
mkdir -p "$root/dev/pts" "$root/dev/shm"
mount -t devpts -o newinstance,ptmxmode=0666 devpts "$root/dev/pts" && mounts+=("$root/dev/pts")
mount -t tmpfs -o mode=1777 tmpfs "$root/dev/shm" && mounts+=("$root/dev/shm")
rm -f "$root/etc/resolv.conf"
cp -L /etc/resolv.conf "$root/etc/resolv.conf"
# CA certificates the host trusts beyond those Debian ships (a site's TLS-inspecting proxy, say): without them pip
# cannot reach PyPI where the host can. They go to /usr/local/share/ca-certificates, which the root's
# ca-certificates package reads once setup.sh installs it; without that package they do nothing.
if [ -r /etc/ssl/certs/ca-certificates.crt ]; then
  mkdir -p "$root/usr/local/share/ca-certificates"
  { find /usr/share/ca-certificates -name '*.crt' -exec cat {} + 2>/dev/null || true; } |
    awk -v bundle=/etc/ssl/certs/ca-certificates.crt -v dir="$root/usr/local/share/ca-certificates" '
      /-----BEGIN CERTIFICATE-----/ { pem = ""; inside = 1 }
      inside { pem = pem $0 "\n" }
      /-----END CERTIFICATE-----/ {
        inside = 0; key = pem; gsub(/[ \t\r\n]/, "", key)
        if (FILENAME != bundle) known[key] = 1
        else if (!(key in known) && !(key in done)) { done[key] = 1; n++; printf "%s", pem > (dir "/host-" n ".crt") }
      }
      END { if (n) print "fresh-root: " n " CA certificate(s) that the host trusts beyond Debian'"'"'s go into the root" }' \
      - /etc/ssl/certs/ca-certificates.crt
fi

status=0
for c in "${cmds[@]}"; do
  start_phase "scripts/$c.sh in the root"
  if run env -i "${envs[@]}" chroot "$root" /bin/bash -c "cd /root/mla && scripts/$c.sh"; then
    end_phase ok
  else
    rc=$?
    end_phase "FAILED (rc $rc)"
    status=1
    break
  fi
done
exit $status
