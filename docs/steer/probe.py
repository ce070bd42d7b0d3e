"""Probes of SO_REUSEPORT steering on this kernel (issue 16 exploration).

Run as root and as an unprivileged user, e.g.
  python3 docs/steer/probe.py cbpf close shutdown uid ebpf
  setpriv --reuid 65534 --regid 65534 --clear-groups python3 docs/steer/probe.py cbpf close shutdown ebpf
`close` and `shutdown` report what happens to queued connections; they
depend on net.ipv4.tcp_migrate_req (read, never changed, here). A probe,
not a test: it sleeps 50 ms for handshakes to land and asserts nothing.
See docs/steer/README.md for what it measured on Linux 6.18.
"""
import ctypes, errno, os, socket, struct, sys, time

SO_ATTACH_REUSEPORT_CBPF = 51
SO_ATTACH_REUSEPORT_EBPF = 52
libc = ctypes.CDLL(None, use_errno=True)


class SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(SockFilter))]


def attach_cbpf_ret(sock, index):
    prog = (SockFilter * 1)(SockFilter(0x06, 0, 0, index))  # BPF_RET|BPF_K
    fprog = SockFprog(1, prog)
    # setsockopt with a struct holding a pointer: call libc directly.
    r = libc.setsockopt(sock.fileno(), socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF,
                        ctypes.byref(fprog), ctypes.sizeof(fprog))
    if r != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def listener(port=0, reuseport=True, backlog=128):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if reuseport:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("127.0.0.1", port))
    s.listen(backlog)
    return s


KEEP = []


def drain(s):
    s.setblocking(False)
    n = 0
    conns = []
    while True:
        try:
            c, _ = s.accept()
            conns.append(c)
            n += 1
        except BlockingIOError:
            KEEP.extend(conns)
            return n, conns
        except OSError as e:
            return f"accept error {e}", conns


def clients(port, n):
    cs = []
    for _ in range(n):
        c = socket.create_connection(("127.0.0.1", port))
        cs.append(c)
    time.sleep(0.05)  # probe script, not a test: let handshakes land
    return cs


def reset_count(cs):
    """Clients whose connection was reset or closed by the server."""
    bad = 0
    for c in cs:
        c.setblocking(False)
        try:
            d = c.recv(1)
            if d == b"":
                bad += 1
        except BlockingIOError:
            pass
        except ConnectionResetError:
            bad += 1
    return bad


def probe_cbpf():
    a = listener()
    port = a.getsockname()[1]
    b = listener(port)
    attach_cbpf_ret(a, 1)
    cs = clients(port, 20)
    na, _ = drain(a)
    nb, _ = drain(b)
    print(f"cbpf ret 1: A got {na}, B got {nb}")
    attach_cbpf_ret(b, 0)
    cs2 = clients(port, 20)
    na, _ = drain(a)
    nb, _ = drain(b)
    print(f"cbpf ret 0 (re-attached through B): A got {na}, B got {nb}")
    attach_cbpf_ret(a, 7)
    cs3 = clients(port, 20)
    na, _ = drain(a)
    nb, _ = drain(b)
    print(f"cbpf ret 7 (out of range, hash fallback): A got {na}, B got {nb}")


def probe_close(n=40):
    a = listener()
    port = a.getsockname()[1]
    b = listener(port)
    attach_cbpf_ret(a, 0)
    cs = clients(port, n)
    a.close()
    time.sleep(0.05)
    nb, _ = drain(b)
    print(f"close A with {n} queued (migrate_req={open('/proc/sys/net/ipv4/tcp_migrate_req').read().strip()}): "
          f"B accepted {nb}, clients reset {reset_count(cs)}")


def probe_shutdown(n=20):
    a = listener()
    port = a.getsockname()[1]
    b = listener(port)
    dup = socket.socket(fileno=os.dup(a.fileno()))
    attach_cbpf_ret(a, 0)
    cs = clients(port, n)
    a.shutdown(socket.SHUT_RD)
    time.sleep(0.05)
    got, _ = drain(dup)
    nb, _ = drain(b)
    print(f"shutdown(SHUT_RD) of A with {n} queued: accept on a dup of A -> {got}; "
          f"B accepted {nb}, clients reset {reset_count(cs)}")
    # connections after the shutdown
    cs2 = clients(port, 10)
    nb2, _ = drain(b)
    print(f"  after it, 10 new connections: B accepted {nb2} (A left the group)")
    try:
        a.listen(128)
        cs3 = clients(port, 10)
        na, _ = drain(dup)
        nb3, _ = drain(b)
        print(f"  listen() again on A: ok; 10 new: A {na}, B {nb3}")
    except OSError as e:
        print(f"  listen() again on A: {e}")


def probe_uid():
    # A is created by root; can another uid join its group?
    a = listener()
    port = a.getsockname()[1]
    pid = os.fork()
    if pid == 0:
        os.setgid(65534)
        os.setuid(65534)
        try:
            listener(port)
            print("nobody joined root's reuseport group: yes")
        except OSError as e:
            print(f"nobody joining root's reuseport group: {e}")
        os._exit(0)
    os.waitpid(pid, 0)




SYS_BPF = 321


def bpf(cmd, attr):
    buf = ctypes.create_string_buffer(bytes(attr), 128)
    r = libc.syscall(SYS_BPF, cmd, buf, 128)
    if r < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"bpf cmd {cmd}: {os.strerror(e)}")
    return r


def insn(code, dst=0, src=0, off=0, imm=0):
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


def ebpf_select_map0(map_fd, attach_type=40):
    prog = b"".join([
        insn(0x18, 2, 1, 0, map_fd), insn(0),       # r2 = map (ld_imm64 pseudo map fd)
        insn(0x62, 10, 0, -4, 0),                  # *(u32 *)(r10 - 4) = 0
        insn(0xbf, 3, 10),                         # r3 = r10
        insn(0x07, 3, 0, 0, -4),                   # r3 += -4
        insn(0xb7, 4, 0, 0, 0),                    # r4 = 0
        insn(0x85, 0, 0, 0, 82),                   # call bpf_sk_select_reuseport
        insn(0xb7, 0, 0, 0, 1),                    # r0 = SK_PASS
        insn(0x95),                                # exit
    ])
    progbuf = ctypes.create_string_buffer(prog)
    lic = ctypes.create_string_buffer(b"GPL")
    log = ctypes.create_string_buffer(4096)
    attr = struct.pack("<IIQQIIQI4xI", 21, len(prog) // 8, ctypes.addressof(progbuf),
                       ctypes.addressof(lic), 1, 4096, ctypes.addressof(log), 0, 0)
    # expected_attach_type is at offset 68 in the prog-load attr
    attr = bytearray(attr.ljust(128, b"\0"))
    struct.pack_into("<I", attr, 68, attach_type)
    try:
        return bpf(5, attr)  # BPF_PROG_LOAD
    except OSError:
        print("verifier:", log.value.decode()[:500])
        raise


def probe_ebpf(n=40):
    a = listener()
    port = a.getsockname()[1]
    b = listener(port)
    map_fd = bpf(0, struct.pack("<IIII", 20, 4, 8, 1))  # MAP_CREATE reuseport sockarray
    def set_map(sock):
        key = ctypes.c_uint32(0)
        val = ctypes.c_uint64(sock.fileno())
        bpf(2, struct.pack("<I4xQQQ", map_fd, ctypes.addressof(key), ctypes.addressof(val), 0))
    set_map(a)
    prog_fd = ebpf_select_map0(map_fd)
    r = libc.setsockopt(a.fileno(), socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_EBPF,
                        ctypes.byref(ctypes.c_int(prog_fd)), 4)
    assert r == 0, os.strerror(ctypes.get_errno())
    cs = clients(port, n)
    print(f"ebpf select map[0]=A: A queued {n} of {n}? B got {drain(b)[0]}")
    set_map(b)
    cs2 = clients(port, 10)
    print(f"  map[0]=B: B got {drain(b)[0]} of 10 new")
    a.close()
    time.sleep(0.05)
    print(f"  close A with {n} queued (SELECT_OR_MIGRATE, migrate_req="
          f"{open('/proc/sys/net/ipv4/tcp_migrate_req').read().strip()}): B accepted {drain(b)[0]}, "
          f"clients reset {reset_count(cs)}")


if __name__ == "__main__":
    for name in sys.argv[1:]:
        globals()["probe_" + name]()
