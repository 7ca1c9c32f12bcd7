"""One keep-alive HTTP/1.1 connection to nginx for the whole run: GET /token.txt every 0.1 s,
logging "<request number> <body>" to /tmp/client.log. Exits on any error or a closed connection."""
import socket, time

s = socket.create_connection(("127.0.0.1", 80))
f = s.makefile("rb")
n = 0
with open("/tmp/client.log", "a", buffering=1) as log:
    while True:
        s.sendall(b"GET /token.txt HTTP/1.1\r\nHost: localhost\r\nConnection: keep-alive\r\n\r\n")
        status = f.readline()
        if not status.startswith(b"HTTP/1.1 200"):
            raise SystemExit("status %r" % status)
        length = None
        while True:
            h = f.readline()
            if h in (b"\r\n", b""):
                break
            k, _, v = h.partition(b":")
            if k.strip().lower() == b"content-length":
                length = int(v)
            if k.strip().lower() == b"connection" and v.strip().lower() == b"close":
                raise SystemExit("server closes the connection")
        body = f.read(length).decode().strip()
        n += 1
        log.write("%d %s\n" % (n, body))
        time.sleep(0.1)
