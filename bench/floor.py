#!/usr/bin/env python3
"""The cold-start floor: boot an image's kernel + initramfs + root disk with a bare,
hand-written QEMU command (the same arguments runner uses), wait for the guest agent,
run /bin/true through it, quit QEMU, and print the elapsed seconds.

The clock starts just before QEMU is started (the overlay is created before that) and stops
when QEMU has exited after QMP `quit`. Everything runner adds on top (finding QEMU, the
accelerator decision, image checks, the overlay, its output wrapper, reports) is not here.

With --resume STATE_DIR (a state runner saved after a first boot, under
<cache>/states/), the floor is instead the least work to resume that state: an overlay of
its disk.qcow2, QEMU with the same arguments plus `-incoming defer`, QMP
`migrate-incoming` of its ram.bin (mapped-ram), `cont`, then the same agent handshake,
`true` and quit. (runner's clock and RNG refresh after a resume is not in this floor.)

Usage: floor.py --table JSON [--cpus N] [--memory MIB] [--timeout S] [--resume STATE_DIR] ARCH IMAGE_DIR

--table is the output of `runner doctor --json`: the machine, CPU, console, kernel command line
and virtio bus of each architecture, so the floor starts exactly the QEMU runner starts.

stdout: one line, the elapsed seconds.
stderr: one line of phases: `floor ARCH agent=S true=S exit=S qemu_maxrss_kib=K`
(agent = first agent answer, true = `true` reported exited, exit = QEMU reaped; with
--resume also restored = migration loaded and `cont` done).

Python 3 standard library only. QEMU runs in its own process group, which is killed, and the
temporary directory removed, on every path (error, timeout, SIGINT, SIGTERM).
"""

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

# The argument vector mirrors engine/src/qemu/spec.rs argv(); the per-arch values come from
# `runner doctor --json` (engine/src/arch.rs), never from a copy here.
SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
AGENT_PORT = "org.qemu.guest_agent.0"
OUTPUT_PORT = "org.runner.output.0"
CONTROL_PORT = "org.runner.control.0"

SYNC_RETRY = 1.0  # resend guest-sync-delimited this often until answered
STATUS_POLL_MIN = 0.01  # guest-exec-status polling: 10 ms, doubling up to 50 ms
STATUS_POLL_MAX = 0.05


class Timeout(Exception):
    pass


class Failed(Exception):
    pass


def esc(path):
    """QEMU option values: a literal comma is written ',,'."""
    return path.replace(",", ",,")


def qemu_argv(binary, row, image, d, cpus, memory, sandbox):
    bus = row["virtio_bus"]
    a = [binary, "-nodefaults", "-no-user-config", "-no-reboot", "-display", "none",
         "-name", "runner-floor", "-machine", row["machine"], "-accel", "tcg,thread=multi",
         "-cpu", row["cpu_tcg"], "-smp", str(cpus), "-m", f"{memory}M"]
    if sandbox:
        a += ["-sandbox", SANDBOX]
    a += ["-kernel", os.path.join(image, "kernel"),
          "-initrd", os.path.join(image, "initrd.cpio"),
          "-append", row["kernel_cmdline"],
          "-serial", "stdio",
          "-drive", "if=none,id=root,discard=unmap,cache=unsafe,format=qcow2,file="
          + esc(os.path.join(d, "overlay.qcow2")),
          "-device", f"virtio-blk-{bus},drive=root",
          "-qmp", f"unix:{esc(os.path.join(d, 'qmp.sock'))},server=on,wait=off",
          "-device", f"virtio-serial-{bus},id=vser0"]
    for cid, sock, port in (("agent0", "agent.sock", AGENT_PORT),
                            ("output0", "output.sock", OUTPUT_PORT),
                            ("control0", "control.sock", CONTROL_PORT)):
        a += ["-chardev",
              f"socket,path={esc(os.path.join(d, sock))},server=on,wait=off,id={cid}",
              "-device", f"virtserialport,bus=vser0.0,chardev={cid},name={port}"]
    return a


class Lines:
    """Newline-delimited JSON over a stream socket; 0xFF delimiter bytes are dropped."""

    def __init__(self, sock, deadline):
        self.sock = sock
        self.deadline = deadline
        self.buf = b""

    def send(self, obj, delimiter=False):
        data = (b"\xff" if delimiter else b"") + json.dumps(obj).encode() + b"\n"
        self.sock.sendall(data)

    def recv(self, until):
        """The next parsed JSON line, or None when `until` (monotonic) passes first."""
        until = min(until, self.deadline)
        while True:
            nl = self.buf.find(b"\n")
            if nl >= 0:
                line, self.buf = self.buf[:nl], self.buf[nl + 1:]
                line = line.replace(b"\xff", b"").strip()
                if not line:
                    continue
                try:
                    return json.loads(line)
                except ValueError:
                    continue  # garbage before the agent's delimiter: skip
            left = until - time.monotonic()
            if left <= 0:
                if time.monotonic() >= self.deadline:
                    raise Timeout("deadline passed")
                return None
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                continue
            if not chunk:
                raise Failed("socket closed (QEMU exited?)")
            self.buf += chunk

    def call(self, obj):
        self.send(obj)
        while True:
            r = self.recv(self.deadline)
            if r is None:
                continue
            if "error" in r:
                raise Failed(f"{obj['execute']}: {r['error']}")
            if "return" in r:
                return r["return"]
            # QMP events ({"event": ...}) and anything else: skip


def connect(path, deadline, proc):
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(path)
            return s
        except OSError:
            s.close()
            if proc.poll() is not None:
                raise Failed(f"QEMU exited ({proc.returncode}) before creating {path}")
            if time.monotonic() >= deadline:
                raise Timeout(f"no socket {path}")
            time.sleep(0.002)


def has_sandbox(binary):
    out = subprocess.run([binary, "-help"], stdin=subprocess.DEVNULL,
                         capture_output=True, text=True, check=False).stdout
    return "-sandbox" in out


def reap(proc, until):
    """Waits for QEMU (our direct child) with wait4; returns its max RSS in KiB or None."""
    while True:
        pid, _status, ru = os.wait4(proc.pid, os.WNOHANG)
        if pid == proc.pid:
            proc.returncode = os.waitstatus_to_exitcode(_status)
            return ru.ru_maxrss
        if time.monotonic() >= until:
            return None
        time.sleep(0.002)


def arch_row(table_path, arch):
    """The row of `runner doctor --json` for `arch`."""
    with open(table_path) as f:
        rows = json.load(f)
    for row in rows:
        if row["name"] == arch:
            return row
    raise Failed(f"{arch} is not in {table_path} ({', '.join(r['name'] for r in rows)})")


def run(args, d):
    row = arch_row(args.table, args.arch)
    binary = shutil.which(row["qemu_binary"])
    if not binary:
        raise Failed(f"{row['qemu_binary']} not found")
    # As runner: the arch's default vCPUs unless asked, cut to what the machine boots with
    # (malta: 1), and memory cut to the machine's limit (mipsel: 256 MiB).
    args.cpus = min(args.cpus or row["default_cpus"], row["max_cpus"])
    args.memory = min(args.memory, row["max_memory_mib"])
    base = os.path.join(args.image, "rootfs.qcow2")
    for f in ("kernel", "initrd.cpio", "rootfs.qcow2"):
        if not os.path.isfile(os.path.join(args.image, f)):
            raise Failed(f"{args.image} has no {f}")
    if args.resume:
        for f in ("meta.json", "ram.bin", "disk.qcow2"):
            if not os.path.isfile(os.path.join(args.resume, f)):
                raise Failed(f"{args.resume} is not a complete saved state (no {f})")
        # The disk must be exactly as it was when the state was saved.
        base = os.path.join(args.resume, "disk.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", base,
                    os.path.join(d, "overlay.qcow2")], check=True, stdin=subprocess.DEVNULL)
    argv = qemu_argv(binary, row, args.image, d, args.cpus, args.memory,
                     has_sandbox(binary))
    if args.resume:
        argv += ["-incoming", "defer"]
    console = open(os.path.join(d, "console.log"), "wb")
    errlog = open(os.path.join(d, "stderr.log"), "wb")

    t0 = time.monotonic()
    deadline = t0 + args.timeout
    proc = subprocess.Popen(argv, cwd=d, stdin=subprocess.DEVNULL, stdout=console,
                            stderr=errlog, start_new_session=True)
    try:
        qmp = Lines(connect(os.path.join(d, "qmp.sock"), deadline, proc), deadline)
        qmp.recv(deadline)  # greeting
        qmp.call({"execute": "qmp_capabilities"})
        t_restored = None
        # Connected before the state loads, as runner does: the helper saved in runner's
        # state then stays blocked (never woken: the floor does no after-resume work).
        control = connect(os.path.join(d, "control.sock"), deadline, proc)
        if args.resume:
            qmp.call({"execute": "migrate-set-capabilities", "arguments": {"capabilities": [
                {"capability": "mapped-ram", "state": True}]}})
            qmp.call({"execute": "migrate-incoming", "arguments": {
                "uri": "file:" + os.path.join(args.resume, "ram.bin")}})
            while True:
                st = qmp.call({"execute": "query-migrate"}).get("status")
                if st == "completed":
                    break
                if st in ("failed", "cancelled"):
                    raise Failed(f"incoming migration {st}")
                time.sleep(0.01)
            qmp.call({"execute": "cont"})
            t_restored = time.monotonic() - t0
        agent = Lines(connect(os.path.join(d, "agent.sock"), deadline, proc), deadline)

        # Handshake: a fresh id every SYNC_RETRY until that id is answered.
        sync_id = 0
        while True:
            sync_id += 1
            agent.send({"execute": "guest-sync-delimited", "arguments": {"id": sync_id}},
                       delimiter=True)
            attempt_end = time.monotonic() + SYNC_RETRY
            answered = False
            while True:
                r = agent.recv(attempt_end)
                if r is None:
                    break
                if r.get("return") == sync_id:
                    answered = True
                    break
            if answered:
                break
            if proc.poll() is not None:
                raise Failed(f"QEMU exited ({proc.returncode}) during boot")
        t_agent = time.monotonic()

        pid = agent.call({"execute": "guest-exec", "arguments": {
            "path": "/bin/true", "arg": [], "env": ["PATH=/usr/bin:/bin"],
            "capture-output": False}})["pid"]
        poll = STATUS_POLL_MIN
        while True:
            st = agent.call({"execute": "guest-exec-status", "arguments": {"pid": pid}})
            if st.get("exited"):
                break
            time.sleep(poll)
            poll = min(poll * 2, STATUS_POLL_MAX)
        if st.get("exitcode", None) != 0:
            raise Failed(f"/bin/true ended with {st}")
        t_true = time.monotonic()

        qmp.send({"execute": "quit"})
        rss = reap(proc, deadline)
        if rss is None:
            raise Timeout("QEMU did not exit after quit")
        t_exit = time.monotonic()
    except BaseException:
        try:
            with open(os.path.join(d, "console.log"), "rb") as f:
                tail = f.read()[-2000:].decode(errors="replace")
            with open(os.path.join(d, "stderr.log"), "rb") as f:
                tail += f.read()[-2000:].decode(errors="replace")
            sys.stderr.write(f"--- console/stderr tail ---\n{tail}\n")
        except OSError:
            pass
        raise
    finally:
        if proc.returncode is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        console.close()
        errlog.close()
    return t_restored, t_agent - t0, t_true - t0, t_exit - t0, rss


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("arch")
    p.add_argument("--table", required=True, help="the output of `runner doctor --json`")
    p.add_argument("image", help="image directory (kernel, initrd.cpio, rootfs.qcow2)")
    p.add_argument("--cpus", type=int, default=None, help="default: the arch's, as runner")
    p.add_argument("--memory", type=int, default=1024, help="MiB")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds, whole run")
    p.add_argument("--resume", metavar="STATE_DIR",
                   help="resume this saved state instead of booting the kernel")
    args = p.parse_args()

    def on_signal(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    d = tempfile.mkdtemp(prefix="floor-")
    try:
        restored, agent, true, total, rss = run(args, d)
    except (Failed, Timeout, subprocess.CalledProcessError, OSError) as e:
        print(f"floor.py: {args.arch}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("floor.py: interrupted", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(d, ignore_errors=True)
    phase = "" if restored is None else f"restored={restored:.3f} "
    print(f"floor {args.arch} {phase}agent={agent:.3f} true={true:.3f} exit={total:.3f} "
          f"qemu_maxrss_kib={rss}", file=sys.stderr)
    print(f"{total:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
