#!/usr/bin/env bash
# vm-guest-boot-test.sh: boot the VM-pod test guest (hack/vm-guest-image.sh, built first when
# not cached) under QEMU TCG and check that it works:
#   the guest agent answers guest-ping; cloud-init read the NoCloud seed (user-data sets the
#   hostname and writes /var/tmp/hello.txt, read back with guest-exec); with no network-config
#   cloud-init's fallback brought eth0 up by DHCP (user-mode network) through ifupdown; the
#   pvpanic driver is bound; a login prompt is on ttyS0; systemd is `running`, not degraded.
#   It then ends the VM: ACPI system_powerdown over QMP, QEMU must exit 0 (or with --panic a
#   sysrq crash, and QEMU must report GUEST_PANICKED).
# Each boot: -accel tcg -M q35 -m 1024 -smp 1, a throwaway qcow2 overlay over the cached
# disk.qcow2, SeaBIOS (bios) or OVMF_CODE.fd + a copy of OVMF_VARS.fd as pflash (uefi).
#
#   hack/vm-guest-boot-test.sh                 # bios and uefi, seed: a CIDATA vfat disk (mtools)
#   hack/vm-guest-boot-test.sh --seed=iso bios # seed: a cidata ISO on a SATA cdrom (AHCI, sr_mod)
#   hack/vm-guest-boot-test.sh --panic bios    # end with a guest panic instead of a power-off
#
# The image's script hashes itself for its cache key: this test is a separate script so that
# changing it does not rebuild the image. Timings (seconds from QEMU's start; power-off from
# system_powerdown) go to stdout, one line per boot, for docs/benchmarks.md; the rest to stderr.
# VMPOD_BOOT_TIMEOUT (default 300 s) bounds the wait for the guest.
# Measured on 2 shared cores, QEMU 7.2, from QEMU's start: agent ping 24-30 s (UEFI 32-45 s),
# hello.txt 38-47 s (UEFI 48-61 s), cloud-init done 50-62 s (UEFI 60-73 s); system_powerdown to
# QEMU's exit 4-5 s; GUEST_PANICKED 0.1 s after the sysrq crash. About 65 s per boot in all.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

SEED=vfat END=powerdown MODES=()
for a in "$@"; do
  case $a in
    --seed=vfat|--seed=iso) SEED=${a#--seed=} ;;
    --panic) END=panic ;;
    bios|uefi) MODES+=("$a") ;;
    *) die "usage: $0 [--seed=vfat|iso] [--panic] [bios|uefi]..." ;;
  esac
done
[ ${#MODES[@]} -gt 0 ] || MODES=(bios uefi)

IMG=$("$VMPOD_ROOT/hack/vm-guest-image.sh")
OVMF_CODE=/usr/share/OVMF/OVMF_CODE.fd OVMF_VARS=/usr/share/OVMF/OVMF_VARS.fd

W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT

# NoCloud seed: user-data and meta-data, no network-config (the fallback must bring eth0 up)
HOST=vmpod-boot-test
mkdir "$W/seed"
printf 'instance-id: %s-%s\nlocal-hostname: %s\n' "$HOST" "$(date +%s)" "$HOST" > "$W/seed/meta-data"
cat > "$W/seed/user-data" <<EOF
#cloud-config
hostname: $HOST
write_files:
  - path: /var/tmp/hello.txt
    content: |
      hello from cloud-init
    permissions: '0644'
EOF
export MTOOLS_SKIP_CHECK=1
case $SEED in
  vfat)
    # 2 MiB FAT12 labelled CIDATA, made and filled with mtools alone
    mformat -C -i "$W/seed.img" -T 4096 -h 2 -s 32 -v CIDATA ::
    mcopy -i "$W/seed.img" "$W/seed/user-data" "$W/seed/meta-data" ::
    SEED_ARGS=(-drive "file=$W/seed.img,if=none,id=seed,format=raw,readonly=on"
               -device virtio-blk-pci,drive=seed) ;;
  iso)
    genisoimage -quiet -output "$W/seed.img" -volid cidata -joliet -rock "$W/seed/user-data" "$W/seed/meta-data"
    SEED_ARGS=(-drive "file=$W/seed.img,if=none,id=seed,format=raw,media=cdrom,readonly=on"
               -device ide-cd,drive=seed) ;;
esac

# The harness: QEMU's child, QGA and QMP clients, timings. argv: run dir, label, end, -- qemu args
cat > "$W/boot.py" <<'PY'
import base64, json, os, socket, subprocess, sys, time

run, label, end = sys.argv[1:4]
qemu_args = sys.argv[sys.argv.index("--") + 1:]
host, hello = os.environ["HOST"], "hello from cloud-init\n"
timeout = float(os.environ.get("VMPOD_BOOT_TIMEOUT", "300"))
serial, qga_path, qmp_path = (os.path.join(run, n) for n in ("serial.log", "qga.sock", "qmp.sock"))

def log(msg):
    print(f"[{label} {time.monotonic() - t0:6.1f}s] {msg}", file=sys.stderr, flush=True)

class Fail(Exception):
    pass

class Chan:
    """Newline-delimited JSON over a unix socket (QGA or QMP)."""
    def __init__(self, path):
        self.s = socket.socket(socket.AF_UNIX)
        self.s.connect(path)
        self.buf, self.events = b"", []
    def send(self, obj):
        # QEMU stops reading while the guest has not opened the port: a full buffer, not a hang
        self.s.settimeout(10)
        try:
            self.s.sendall(json.dumps(obj).encode() + b"\n")
        except socket.timeout:
            raise Fail(f"{obj['execute']}: the socket takes no more data (nobody reads it)")
    def recv(self, wait):
        deadline = time.monotonic() + wait
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.s.settimeout(left)
            try:
                d = self.s.recv(65536)
            except socket.timeout:
                return None
            if not d:
                raise Fail("socket closed")
            self.buf += d
        line, self.buf = self.buf.split(b"\n", 1)
        line = line.strip(b"\xff \r")
        return json.loads(line) if line else self.recv(max(deadline - time.monotonic(), 0))
    def cmd(self, execute, wait=30, **arguments):
        msg = {"execute": execute}
        if arguments:
            msg["arguments"] = arguments
        self.send(msg)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            r = self.recv(deadline - time.monotonic())
            if r is None:
                break
            if "event" in r:
                self.events.append(r)
            elif "error" in r:
                raise Fail(f"{execute}: {r['error']}")
            elif "return" in r:
                return r["return"]
        raise Fail(f"{execute}: no answer in {wait} s")

def serial_text():
    try:
        with open(serial, errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return ""

def alive():
    if qemu.poll() is not None:
        raise Fail(f"QEMU exited early, rc {qemu.returncode}: {open(os.path.join(run, 'qemu.log')).read().strip()}")

def until(what, check, every=1.0):
    """Poll check() until it returns a true value; the value."""
    while True:
        alive()
        v = check()
        if v:
            return v
        if time.monotonic() - t0 > timeout:
            raise Fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)

def gexec(path, *args):
    pid = qga.cmd("guest-exec", path=path, arg=list(args), **{"capture-output": True})["pid"]
    while True:
        st = qga.cmd("guest-exec-status", pid=pid)
        if st.get("exited"):
            out = base64.b64decode(st.get("out-data", "")).decode(errors="replace")
            err = base64.b64decode(st.get("err-data", "")).decode(errors="replace")
            return st.get("exitcode"), out, err
        time.sleep(0.2)

def connect_qga():
    """guest-sync with a fresh id every 2 s until the agent echoes the latest one (QEMU buffers
    what is written before the guest opens its port, so stale replies are skipped)."""
    c, sid, last = Chan(qga_path), 0, 0.0
    while True:
        alive()
        if time.monotonic() - t0 > timeout:
            raise Fail(f"timed out after {timeout:.0f} s waiting for the guest agent")
        if time.monotonic() - last > 2:
            sid += 1
            c.send({"execute": "guest-sync", "arguments": {"id": sid}})
            last = time.monotonic()
        r = c.recv(0.25)
        if r is not None and r.get("return") == sid:
            return c

t0 = time.monotonic()
qemu = subprocess.Popen(
    ["qemu-system-x86_64", "-accel", "tcg", "-M", "q35", "-m", "1024", "-smp", "1",
     "-nodefaults", "-display", "none", "-serial", f"file:{serial}",
     "-qmp", f"unix:{qmp_path},server=on,wait=off",
     "-chardev", f"socket,path={qga_path},server=on,wait=off,id=qga0",
     "-device", "virtio-serial-pci", "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
     "-device", "pvpanic",
     "-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0,romfile="] + qemu_args,
    stdin=subprocess.DEVNULL, stdout=open(os.path.join(run, "qemu.log"), "w"), stderr=subprocess.STDOUT)
t = {}
try:
    until("QEMU's sockets", lambda: os.path.exists(qmp_path) and os.path.exists(qga_path), 0.05)
    qmp = Chan(qmp_path)
    qmp.recv(10)  # greeting
    qmp.cmd("qmp_capabilities")

    qga = connect_qga()
    qga.cmd("guest-ping")
    t["ping"] = time.monotonic() - t0
    log("guest-ping answered")

    def hello_present():
        rc, out, _ = gexec("/bin/cat", "/var/tmp/hello.txt")
        if rc == 0 and out != hello:
            raise Fail(f"hello.txt is {out!r}, want {hello!r}")
        return rc == 0
    until("/var/tmp/hello.txt (cloud-init write_files)", hello_present)
    t["hello"] = time.monotonic() - t0
    log("guest-exec cat /var/tmp/hello.txt: " + hello.strip())

    until("cloud-init to finish", lambda: gexec("/bin/test", "-f", "/var/lib/cloud/instance/boot-finished")[0] == 0)
    t["cloudinit"] = time.monotonic() - t0
    log("cloud-init finished")

    def system_state():
        _, out, _ = gexec("/bin/systemctl", "is-system-running")
        out = out.strip()
        return out if out not in ("initializing", "starting") else None
    state = until("systemd to finish starting", system_state)
    if state != "running":
        _, failed, _ = gexec("/bin/systemctl", "--failed", "--no-legend")
        raise Fail(f"systemd is {state}: {failed.strip()}")
    _, analyze, _ = gexec("/usr/bin/systemd-analyze")
    log(analyze.strip().splitlines()[0])

    _, name, _ = gexec("/bin/hostname")
    if name.strip() != host:
        raise Fail(f"hostname is {name.strip()!r}, want {host!r} (cloud-init set_hostname)")
    _, eni, _ = gexec("/bin/cat", "/etc/network/interfaces.d/50-cloud-init")
    if "iface eth0 inet dhcp" not in eni:
        raise Fail(f"cloud-init's fallback network config has no DHCP on eth0: {eni!r}")
    _, addr, _ = gexec("/bin/ip", "-4", "-o", "addr", "show", "dev", "eth0")
    if "inet 10.0.2.15/" not in addr:
        raise Fail(f"eth0 got no DHCP lease from QEMU's user network: {addr!r}")
    log("eth0 by DHCP (cloud-init fallback, ifupdown): " + addr.split()[3])
    rc, bound, _ = gexec("/bin/ls", "/sys/bus/platform/drivers/pvpanic-mmio")
    if rc != 0 or "QEMU0001" not in bound:
        raise Fail(f"pvpanic-mmio is not bound to QEMU's pvpanic device: {bound!r}")
    _, mods, _ = gexec("/bin/cat", "/proc/modules")
    log("pvpanic bound: " + " ".join(l.split()[0] for l in mods.splitlines() if "pvpanic" in l))
    until("a login prompt on ttyS0", lambda: "login:" in serial_text(), 0.5)
    prompt = [l for l in serial_text().splitlines() if "login:" in l][-1]
    log("login prompt on ttyS0: " + prompt[:prompt.index("login:") + 6].strip())

    if end == "powerdown":
        t_end = time.monotonic()
        qmp.cmd("system_powerdown")
        try:
            rc = qemu.wait(60)
        except subprocess.TimeoutExpired:
            raise Fail("QEMU still runs 60 s after system_powerdown")
        if rc != 0:
            raise Fail(f"QEMU exited {rc} after system_powerdown")
        t["poweroff"] = time.monotonic() - t_end
        log("powered off, QEMU exited 0")
    else:
        t_end = time.monotonic()
        qga.send({"execute": "guest-exec", "arguments": {"path": "/bin/sh", "arg": ["-c", "echo c > /proc/sysrq-trigger"]}})
        # QEMU's default panic action is shutdown: it may exit right after the event, so read
        # the events until GUEST_PANICKED or until QEMU closes the socket
        deadline = time.monotonic() + 60
        while not any(e["event"] == "GUEST_PANICKED" for e in qmp.events) and time.monotonic() < deadline:
            try:
                r = qmp.recv(0.5)
            except (Fail, OSError):
                break
            if r is not None and "event" in r:
                qmp.events.append(r)
        if not any(e["event"] == "GUEST_PANICKED" for e in qmp.events):
            raise Fail(f"no GUEST_PANICKED event; QMP events: {[e['event'] for e in qmp.events]}")
        t["panic"] = time.monotonic() - t_end
        log("QEMU reported GUEST_PANICKED")
except Exception as e:
    log(f"FAIL: {e if isinstance(e, Fail) else repr(e)}")
    tail = serial_text().splitlines()[-40:]
    print("serial console, last lines:\n  " + "\n  ".join(tail), file=sys.stderr)
    sys.exit(1)
finally:
    if qemu.poll() is None:
        qemu.kill()
        qemu.wait()
parts = [f"agent ping {t['ping']:.1f} s", f"hello.txt {t['hello']:.1f} s", f"cloud-init done {t['cloudinit']:.1f} s"]
parts.append(f"power-off {t['poweroff']:.1f} s" if "poweroff" in t else f"panic reported {t['panic']:.1f} s")
print(f"{label}: " + ", ".join(parts), flush=True)
PY

fails=0
for mode in "${MODES[@]}"; do
  run=$W/$mode
  mkdir "$run"
  qemu-img create -q -f qcow2 -b "$IMG/disk.qcow2" -F qcow2 "$run/overlay.qcow2"
  FW=()
  if [ "$mode" = uefi ]; then
    cp "$OVMF_VARS" "$run/vars.fd"
    FW=(-drive "if=pflash,format=raw,unit=0,file=$OVMF_CODE,readonly=on"
        -drive "if=pflash,format=raw,unit=1,file=$run/vars.fd")
  fi
  log "boot $mode (seed: $SEED, end: $END) from $IMG"
  HOST=$HOST python3 "$W/boot.py" "$run" "$mode/$SEED" "$END" -- "${FW[@]}" \
    -drive "file=$run/overlay.qcow2,if=none,id=root,format=qcow2" -device virtio-blk-pci,drive=root,bootindex=0 \
    "${SEED_ARGS[@]}" || fails=$((fails + 1))
done
[ $fails = 0 ] || die "$fails of ${#MODES[@]} boots failed"
log "all ${#MODES[@]} boots passed"
