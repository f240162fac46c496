# The syscall battery: makes each syscall of the sandbox policy
# (bulkhead_sandbox::seccomp_policy) by number, and prints one JSON object
# with what the kernel answered.
#
# Prints "call gate answer" per attempt (answer: ok, an errno name, or
# "killed by SIG..."), then "missing ..." if the policy names a syscall this
# program has no attempt for.
#
# argv[1] is JSON from the Rust side: {"refused": {name: number},
# "not_implemented": {name: number}, "clone": number,
# "namespace_flags": {name: value}}; the numbers come from the same list as
# the filters, so this program holds no syscall numbers of its own.
#
# Every attempt uses arguments that would succeed if the syscall were
# allowed ("reachable"), or, where even that is impossible for a process
# without capabilities, arguments the kernel rejects with another errno
# before it looks at capabilities (a bad pointer, bad flags, a bad fd): an
# EPERM from those can only come from the filter. The few syscalls whose
# capability check comes before anything else are marked "capability": for
# them EPERM is the answer with or without a filter, and only the profile's
# content (checked elsewhere) shows they are refused by it.
#
# Each attempt runs in a child process of its own, so that what one changes
# (a ptrace link, a keyring, a namespace) cannot affect the next.

import ctypes
import errno
import json
import os
import signal
import sys

spec = json.loads(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long


def arg(value):
    if isinstance(value, int):
        return ctypes.c_long(value)
    return value


def call(number, *args):
    ctypes.set_errno(0)
    ret = libc.syscall(ctypes.c_long(number), *[arg(a) for a in args])
    return ret, ctypes.get_errno() if ret == -1 else 0


def addr(buffer):
    return ctypes.cast(buffer, ctypes.c_void_p).value


def cstr(text):
    return ctypes.c_char_p(text.encode())


BAD_POINTER = 1  # a user address no mapping can have: EFAULT when copied
AT_FDCWD = -100
O_CLOEXEC = 0o2000000


def process_vm(number):
    source = ctypes.create_string_buffer(b"bulkhead", 8)
    target = ctypes.create_string_buffer(8)
    local = (ctypes.c_void_p * 2)(addr(target), 8)
    remote = (ctypes.c_void_p * 2)(addr(source), 8)
    return call(number, os.getpid(), addr(local), 1, addr(remote), 1, 0)


def perf_event_open(number):
    attr = ctypes.create_string_buffer(112)  # PERF_ATTR_SIZE_VER5
    ctypes.c_uint32.from_buffer(attr, 0).value = 1  # PERF_TYPE_SOFTWARE
    ctypes.c_uint32.from_buffer(attr, 4).value = 112
    ctypes.c_uint64.from_buffer(attr, 8).value = 0  # PERF_COUNT_SW_CPU_CLOCK
    # disabled, exclude_kernel, exclude_hv: what an unprivileged user may ask
    ctypes.c_uint64.from_buffer(attr, 40).value = (1 << 0) | (1 << 5) | (1 << 6)
    return call(number, addr(attr), 0, -1, -1, 8)  # this thread, any CPU, FD_CLOEXEC


def io_uring(numbers):
    """setup on four entries; enter and register on the ring it made (or on
    no ring, EBADF, if setup was refused)."""
    params = ctypes.create_string_buffer(120)
    ring = call(numbers["io_uring_setup"], 4, addr(params))[0]
    return ring


def clone_child(ret):
    if ret == 0:  # the child of a raw clone or clone3: leave at once
        os._exit(0)
    if ret > 0:
        os.waitpid(ret, 0)


def attempts(numbers):
    n = numbers
    handle = ctypes.create_string_buffer(8 + 128)
    ctypes.c_uint32.from_buffer(handle, 0).value = 128
    mount_id = ctypes.c_int()
    timex = ctypes.create_string_buffer(256)  # modes 0: read the clock's state
    probe = ctypes.create_string_buffer(16 + 256 * 8)
    ring = lambda: io_uring(n) if "io_uring_setup" in n else -1  # noqa: E731
    return {
        # Reachable: these would succeed, or fail with another errno.
        "mount": ("reachable", "type at a bad address: EFAULT before the capability check",
                  lambda: call(n["mount"], cstr("none"), cstr("/tmp"), BAD_POINTER, 0, 0)),
        "umount2": ("reachable", "unknown flags: EINVAL first",
                    lambda: call(n["umount2"], cstr("/tmp"), 0x7FFF0000)),
        "chroot": ("reachable", "a missing folder: ENOENT before the capability check",
                   lambda: call(n["chroot"], cstr("/nonexistent-bulkhead"))),
        "open_tree": ("reachable", "an O_PATH fd on / (no clone: needs no capability)",
                      lambda: call(n["open_tree"], AT_FDCWD, cstr("/"), O_CLOEXEC)),
        "fsconfig": ("reachable", "fd -1: EINVAL/EBADF first",
                     lambda: call(n["fsconfig"], -1, 6, 0, 0, 0)),
        "mount_setattr": ("reachable", "unknown flags: EINVAL first",
                          lambda: call(n["mount_setattr"], AT_FDCWD, cstr("/"), 0x7FFF0000, 0, 0)),
        "unshare": ("reachable", "a user namespace, which an unprivileged user may make",
                    lambda: call(n["unshare"], spec["namespace_flags"]["CLONE_NEWUSER"])),
        "setns": ("reachable", "fd -1: EBADF first", lambda: call(n["setns"], -1, 0)),
        "ptrace": ("reachable", "PTRACE_TRACEME", lambda: call(n["ptrace"], 0, 0, 0, 0)),
        "process_vm_readv": ("reachable", "reads its own memory",
                             lambda: process_vm(n["process_vm_readv"])),
        "process_vm_writev": ("reachable", "writes its own memory",
                              lambda: process_vm(n["process_vm_writev"])),
        "kcmp": ("reachable", "KCMP_FILE of its own stderr with itself",
                 lambda: call(n["kcmp"], os.getpid(), os.getpid(), 0, 2, 2)),
        "pidfd_getfd": ("reachable", "a copy of its own stderr",
                        lambda: call(n["pidfd_getfd"], os.pidfd_open(os.getpid()), 2, 0)),
        "quotactl": ("reachable", "Q_SYNC of every filesystem, which needs no capability",
                     lambda: call(n["quotactl"], (0x800001 << 8), 0, 0, 0)),
        "iopl": ("reachable", "level 0, its own: no capability needed",
                 lambda: call(n["iopl"], 0)),
        "ioperm": ("reachable", "turning port 0x80 off: no capability needed",
                   lambda: call(n["ioperm"], 0x80, 1, 0)),
        "bpf": ("reachable", "BPF_MAP_CREATE with an attr too large, its tail not zero: "
                "E2BIG before the check of kernel.unprivileged_bpf_disabled",
                lambda: bpf_e2big(n["bpf"])),
        "perf_event_open": ("reachable", "a software clock on this thread, user space only",
                            lambda: perf_event_open(n["perf_event_open"])),
        "userfaultfd": ("reachable", "O_CLOEXEC | UFFD_USER_MODE_ONLY",
                        lambda: call(n["userfaultfd"], O_CLOEXEC | 1)),
        "io_uring_setup": ("reachable", "a ring of four entries",
                           lambda: call(n["io_uring_setup"], 4, addr(ctypes.create_string_buffer(120)))),
        "io_uring_enter": ("reachable", "on a fresh ring (EBADF if there is none)",
                           lambda: call(n["io_uring_enter"], ring(), 0, 0, 0, 0, 0)),
        "io_uring_register": ("reachable", "IORING_REGISTER_PROBE on a fresh ring (EBADF if none)",
                              lambda: call(n["io_uring_register"], ring(), 8, addr(probe), 256)),
        "keyctl": ("reachable", "KEYCTL_GET_KEYRING_ID of the session keyring",
                   lambda: call(n["keyctl"], 0, -3, 0)),
        "add_key": ("reachable", "a user key in the process keyring",
                    lambda: call(n["add_key"], cstr("user"), cstr("bulkhead"), cstr("x"), 1, -2)),
        "request_key": ("reachable", "a user key that does not exist: ENOKEY",
                        lambda: call(n["request_key"], cstr("user"), cstr("bulkhead-absent"), 0, 0)),
        "name_to_handle_at": ("reachable", "the handle of the working folder",
                              lambda: call(n["name_to_handle_at"], AT_FDCWD, cstr("."),
                                           addr(handle), addr(ctypes.pointer(mount_id)), 0)),
        "fanotify_init": ("reachable", "FAN_CLASS_NOTIF | FAN_REPORT_FID, unprivileged since 5.13",
                          lambda: call(n["fanotify_init"], 0x200, 0)),
        "settimeofday": ("reachable", "time zone at a bad address: EFAULT first",
                         lambda: call(n["settimeofday"], 0, BAD_POINTER)),
        "clock_settime": ("reachable", "time at a bad address: EFAULT first",
                          lambda: call(n["clock_settime"], 0, BAD_POINTER)),
        "clock_adjtime": ("reachable", "CLOCK_REALTIME, modes 0: reads the clock",
                          lambda: call(n["clock_adjtime"], 0, addr(timex))),
        "adjtimex": ("reachable", "modes 0: reads the clock", lambda: call(n["adjtimex"], addr(timex))),
        # Capability: the kernel checks the capability before anything else.
        "pivot_root": ("capability", "", lambda: call(n["pivot_root"], cstr("."), cstr("."))),
        "move_mount": ("capability", "", lambda: call(n["move_mount"], -1, cstr(""), -1, cstr(""), 0)),
        "fsopen": ("capability", "", lambda: call(n["fsopen"], cstr("tmpfs"), 0)),
        "fsmount": ("capability", "", lambda: call(n["fsmount"], -1, 0, 0)),
        "fspick": ("capability", "", lambda: call(n["fspick"], AT_FDCWD, cstr("/"), 0)),
        "kexec_load": ("capability", "", lambda: call(n["kexec_load"], 0, 0, 0, 0)),
        "kexec_file_load": ("capability", "", lambda: call(n["kexec_file_load"], -1, -1, 0, 0, 0)),
        "init_module": ("capability", "", lambda: call(n["init_module"], 0, 0, cstr(""))),
        "finit_module": ("capability", "", lambda: call(n["finit_module"], -1, cstr(""), 0)),
        "delete_module": ("capability", "", lambda: call(n["delete_module"], cstr("bulkhead"), 0)),
        "reboot": ("capability", "bad magic", lambda: call(n["reboot"], 0, 0, 0, 0)),
        "swapon": ("capability", "", lambda: call(n["swapon"], cstr("/nonexistent-bulkhead"), 0)),
        "swapoff": ("capability", "", lambda: call(n["swapoff"], cstr("/nonexistent-bulkhead"))),
        "acct": ("capability", "", lambda: call(n["acct"], 0)),
        "syslog": ("capability", "SYSLOG_ACTION_SIZE_BUFFER (free unless kernel.dmesg_restrict)",
                   lambda: call(n["syslog"], 10, 0, 0)),
        "lookup_dcookie": ("capability", "", lambda: call(n["lookup_dcookie"], 0, 0, 0)),
        "vhangup": ("capability", "", lambda: call(n["vhangup"])),
        "sethostname": ("capability", "", lambda: call(n["sethostname"], cstr("x"), 1)),
        "setdomainname": ("capability", "", lambda: call(n["setdomainname"], cstr("x"), 1)),
        "open_by_handle_at": ("capability", "mount fd -1: EBADF first on recent kernels",
                              lambda: call(n["open_by_handle_at"], -1, addr(handle), 0)),
    }


def bpf_e2big(number):
    attr = ctypes.create_string_buffer(8192)
    attr[8191] = b"\x01"
    return call(number, 0, addr(attr), len(attr))


def in_child(attempt):
    """Runs attempt() in a child; returns (ret, errno) or a signal name."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            answer = list(attempt())
        except Exception as e:  # noqa: BLE001 - reported, never hidden
            answer = [None, "raised " + repr(e)]
        try:
            os.write(write, json.dumps(answer).encode())
        finally:
            os._exit(0)
    os.close(write)
    data = b""
    while chunk := os.read(read, 4096):
        data += chunk
    os.close(read)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return None, "killed by " + signal.Signals(os.WTERMSIG(status)).name
    return json.loads(data) if data else (None, "no answer")


def outcome(name, gate, detail, attempt):
    ret, err = in_child(attempt)
    if isinstance(err, str):
        answer = err
    else:
        answer = "ok" if err == 0 else errno.errorcode.get(err, str(err))
    return name + " " + gate + " " + answer


def main():
    numbers = dict(spec["refused"])
    table = attempts(numbers)
    results = []
    missing = [name for name in numbers if name not in table]
    for name in numbers:
        if name in table:
            gate, detail, attempt = table[name]
            results.append(outcome(name, gate, detail, attempt))
    clone = spec["clone"]
    sigchld = int(signal.SIGCHLD)
    for flag, value in spec["namespace_flags"].items():
        # With a new user namespace every other namespace is the caller's to
        # make: the call would succeed.
        flags = value | spec["namespace_flags"]["CLONE_NEWUSER"] | sigchld

        def attempt(flags=flags):
            ret, err = call(clone, flags, 0, 0, 0, 0)
            clone_child(ret)
            return ret, err

        results.append(outcome("clone(" + flag + ")", "reachable", "a child in new namespaces",
                               attempt))

    def plain_clone():
        ret, err = call(clone, sigchld, 0, 0, 0, 0)
        clone_child(ret)
        return (0 if ret > 0 else ret), err

    results.append(outcome("clone()", "allowed", "a plain child, like fork", plain_clone))
    for name, number in spec["not_implemented"].items():
        def attempt(number=number):
            args = ctypes.create_string_buffer(64)  # CLONE_ARGS_SIZE_VER0
            ctypes.c_uint64.from_buffer(args, 32).value = sigchld  # exit_signal
            ret, err = call(number, addr(args), 64)
            clone_child(ret)
            return (0 if ret > 0 else ret), err

        results.append(outcome(name, "reachable", "a plain child (would fork)", attempt))
    # One line per attempt, "call gate answer": short, so that the report
    # fits the smallest output limit.
    print("\n".join(results))
    if missing:
        print("missing " + " ".join(missing))


main()
