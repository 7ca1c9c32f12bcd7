"""A Python program with the kernel objects CRIU has to bring back: threads, a multiprocessing
pool, a pipe, a unix socket pair, a flock and an fcntl lock, an eventfd, a timerfd, and files in
/dev/shm. Every 0.1 s it checks each of them and logs "<tick> ok" or "<tick> FAIL <what>" to
/tmp/client.log; /tmp/ready once all is set. The timerfd is checked only with --timerfd (see
docs/workloads.md)."""
import ctypes, fcntl, multiprocessing, os, socket, struct, sys, threading, time

libc = ctypes.CDLL(None, use_errno=True)

class Timespec(ctypes.Structure):
    _fields_ = [("sec", ctypes.c_long), ("nsec", ctypes.c_long)]

class Itimerspec(ctypes.Structure):
    _fields_ = [("interval", Timespec), ("value", Timespec)]

def square(x):
    return x * x

def other_process_can_lock(path, use_flock):
    """From a child process: can it take the lock? (It must not: we hold it.)"""
    fd = os.open(path, os.O_RDWR)
    try:
        if use_flock:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)

def main():
    counts = [0, 0]
    def spin(i):
        while True:
            counts[i] += 1
            time.sleep(0.01)
    for i in range(2):
        threading.Thread(target=spin, args=(i,), daemon=True).start()
    pool = multiprocessing.Pool(2)
    r, w = os.pipe()
    a, b = socket.socketpair()
    for p in ("/tmp/flock", "/tmp/fcntl"):
        open(p, "w").close()
    flock_fd = os.open("/tmp/flock", os.O_RDWR)
    fcntl.flock(flock_fd, fcntl.LOCK_EX)
    fcntl_fd = os.open("/tmp/fcntl", os.O_RDWR)
    fcntl.lockf(fcntl_fd, fcntl.LOCK_EX)
    efd = os.eventfd(0)
    tfd = libc.timerfd_create(1, 0)  # CLOCK_MONOTONIC
    spec = Itimerspec(Timespec(0, 50_000_000), Timespec(0, 50_000_000))
    if tfd < 0 or libc.timerfd_settime(tfd, 0, ctypes.byref(spec), None) != 0:
        raise SystemExit("timerfd: errno %d" % ctypes.get_errno())
    shm_token = "shm-%s" % os.urandom(8).hex()
    with open("/dev/shm/token", "w") as f:
        f.write(shm_token)
    open("/tmp/ready", "w").close()
    tick = 0
    with open("/tmp/client.log", "a", buffering=1) as log:
        while True:
            tick += 1
            fails = []
            before = list(counts)
            # Both threads go on (within a second: right after a restore, a thread may still be
            # in the sleep it was dumped in).
            deadline = time.monotonic() + 1.0
            while not all(c > b for c, b in zip(counts, before)) and time.monotonic() < deadline:
                time.sleep(0.01)
            if not all(c > b for c, b in zip(counts, before)):
                fails.append("threads")
            try:
                if pool.apply_async(square, (tick,)).get(timeout=5) != tick * tick:
                    fails.append("pool")
            except Exception as e:
                fails.append("pool:%s" % e)
            os.write(w, b"p%d" % tick)
            if os.read(r, 64) != b"p%d" % tick:
                fails.append("pipe")
            a.sendall(b"s%d" % tick)
            if b.recv(64) != b"s%d" % tick:
                fails.append("socketpair")
            if pool.apply(other_process_can_lock, ("/tmp/flock", True)):
                fails.append("flock")
            if pool.apply(other_process_can_lock, ("/tmp/fcntl", False)):
                fails.append("fcntl")
            os.eventfd_write(efd, 3)
            if os.eventfd_read(efd) != 3:
                fails.append("eventfd")
            if "--timerfd" in sys.argv:
                buf = os.read(tfd, 8)
                if struct.unpack("Q", buf)[0] < 1:
                    fails.append("timerfd")
            with open("/dev/shm/token") as f:
                if f.read() != shm_token:
                    fails.append("shm")
            log.write("%d %s\n" % (tick, "ok" if not fails else "FAIL " + ",".join(fails)))
            time.sleep(0.05)

if __name__ == "__main__":
    main()
