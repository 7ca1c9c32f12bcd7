"""One connection to Redis for the whole run: INCR a counter and GET a key kept only in memory
every 0.1 s, logging "<counter> <value>" to /tmp/client.log. Exits on any error (a broken
connection is not reopened)."""
import socket, time

s = socket.create_connection(("127.0.0.1", 6379))
f = s.makefile("rb")

def cmd(*args):
    out = b"*%d\r\n" % len(args)
    for a in args:
        a = a.encode()
        out += b"$%d\r\n%s\r\n" % (len(a), a)
    s.sendall(out)
    line = f.readline()
    if line.startswith(b":"):
        return line[1:].strip().decode()
    if line.startswith(b"$"):
        n = int(line[1:])
        if n < 0:
            return "(nil)"
        data = f.read(n + 2)
        return data[:-2].decode()
    raise SystemExit("unexpected reply %r" % line)

with open("/tmp/client.log", "a", buffering=1) as log:
    while True:
        log.write("%s %s\n" % (cmd("INCR", "counter"), cmd("GET", "mem:key")))
        time.sleep(0.1)
