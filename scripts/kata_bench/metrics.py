"""The metrics path: the shims' monitor sockets and kata-monitor, latency and memory."""
import statistics
import subprocess
import time
import http.client

from .config import RUNTIMES
from .host import pct, rss_kib
from .starts import remove, start_detached


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path, timeout=10):
        super().__init__("shim", timeout=timeout)
        self.path = path

    def connect(self):
        import socket
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.path)


def get_ms(conn_factory, path):
    c = conn_factory()
    t0 = time.perf_counter()
    c.request("GET", path)
    r = c.getresponse()
    body = r.read()
    ms = (time.perf_counter() - t0) * 1000
    c.close()
    if r.status != 200 or not body:
        raise RuntimeError(f"GET {path}: {r.status}")
    return ms


def bench_scrape(sock, counts, n=30):
    """Latency of the shim's /metrics and of kata-monitor's /metrics (median, p99) with 1 and N
    sandboxes, and kata-monitor's RSS."""
    import http.client
    import socket as so
    with so.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mon = subprocess.Popen(["/opt/kata/bin/kata-monitor", "--listen-address", f"127.0.0.1:{port}",
                            "--runtime-endpoint", sock], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    res = {}
    try:
        deadline = time.time() + 10
        while time.time() < deadline:
            try:
                get_ms(lambda: http.client.HTTPConnection("127.0.0.1", port, timeout=5), "/")
                break
            except OSError:
                time.sleep(0.1)
        for count in counts:
            cids = [f"bench-scrape-{i}" for i in range(count)]
            for cid in cids:
                start_detached(sock, RUNTIMES["kata"], cid)
            time.sleep(3)
            shim = [get_ms(lambda: UnixHTTPConnection(f"/run/vc/sbs/{cids[i % count]}/shim-monitor.sock"), "/metrics")
                    for i in range(n)]
            monitor = [get_ms(lambda: http.client.HTTPConnection("127.0.0.1", port, timeout=30), "/metrics")
                       for _ in range(n)]
            res[str(count)] = {
                "shim_ms": {"median": round(statistics.median(shim), 1), "p99": pct(shim, 99), "samples": [round(x, 1) for x in shim]},
                "monitor_ms": {"median": round(statistics.median(monitor), 1), "p99": pct(monitor, 99), "samples": [round(x, 1) for x in monitor]},
                "monitor_rss_kib": rss_kib(mon.pid),
            }
            for cid in cids:
                remove(sock, cid)
    finally:
        mon.kill()
        mon.wait()
    return res
