"""Streaming: does an SSE event reach the client as soon as the server writes it?

The fake Kimi server (bench._stamped_fake: testbed.fake_kimi plus a CLOCK_MONOTONIC
stamp per SSE event written) streams 9 events, ``--event-delay`` apart. A raw-socket
client reads the stream and notes when each event arrives. Per event, the *leg* is
arrival minus the server's stamp: the time from the server writing the event to the
client having it, through whatever sits between.

Arms, alternating in rounds:
  direct  client -> fake server (the floor: loopback plus the client)
  bare    mitmdump --set stream_large_bodies=1 (reverse mode)
  addon   mitmdump -s kimi_rotator_addon.py (reverse mode, 3 keys); the addon streams
          successful text/event-stream answers itself, from its responseheaders hook
  retried the addon again, with pairs of keys of which the first is always refused
          (429, for 1 ms, round-robin; a fresh proxy every 7 streams, see RetriedArm):
          every stream is refused on its first key and retried on the second, whose answer the addon relays into the client's held
          response (rotator/proxy/splice.py) event by event
Bare mitmdump buffers a whole response unless told to stream it, so its SSE would
arrive all at once at the end; stream_large_bodies=1 makes it stream any body larger
than 1 byte. (A chunked body's size is unknown, so mitmproxy streams it once the first
chunk is in; the option also streams the bare arm's request body, which the leg does
not include.) One stream through a bare mitmdump *without* the option shows the
buffering for comparison.

For the retried arm, "send→1st" is compared with the addon arm's: a retry should cost
one refusal round trip (measured through bare mitmdump: a request the fake refuses) and
a few ms more, not the whole answer.

    python bench/streaming.py [--quick] [--rounds N] [--streams N] [--event-delay S] [--deltas N]
"""

from __future__ import annotations

import json
import re
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import _common as C  # noqa: E402

TARGET_RATIO = 1.02
ARMS = ("direct", "bare", "addon", "retried")
# The retried arm: each stream is refused on the first key of a pair (C.bench_key numbers
# 100, 102, …) and served by the second. Kimi's refusals cost a key health (−15) and three
# refused keys within 5 s pause the pool (a throttle), so one proxy serves at most
# STREAMS_PER_PROXY streams, over two pairs; then a fresh proxy, with fresh keys, takes over.
RETRY_SLACK_MS = 5.0  # what a retry may cost beyond one refusal round trip
STREAMS_PER_PROXY = 8  # 4 refusals a key leave it at health 40, above the skip line (30)
PAIRS_PER_PROXY = 2


class RetriedArm:
    """The retried arm's proxies, each warmed up with one stream before it is measured."""

    def __init__(self, work: Path, fake_port: int, stream_s: float) -> None:
        self.work, self.fake_port, self.stream_s = work, fake_port, stream_s
        self.started: list[tuple[object, Path, tuple[int, ...]]] = []  # (proxy, file, key numbers)
        self.served = STREAMS_PER_PROXY

    @staticmethod
    def key_numbers(proxy_number: int) -> tuple[int, ...]:
        first = 100 + 2 * PAIRS_PER_PROXY * proxy_number
        return tuple(range(first, first + 2 * PAIRS_PER_PROXY))

    def port(self) -> int:
        if self.served >= STREAMS_PER_PROXY:
            number = len(self.started)
            name = f"retried-{number}"
            numbers = self.key_numbers(number)
            accounts = C.make_accounts_file(self.work / name / "kimi-accounts.json", 0, "round-robin", numbers=numbers)
            proxy = C.start_proxy(self.work, name, self.fake_port, addon=True, accounts=accounts,
                                  options={"kimi_affinity": "false"})
            self.started.append((proxy, accounts, numbers))
            stream_once(proxy.port, self.stream_s + 5)  # warm-up: imports, first-flow paths
            self.served = 1
        self.served += 1
        return self.started[-1][0].port  # type: ignore[attr-defined]

    def stop(self) -> tuple[tuple[int, int], tuple[int, int], int]:
        """Stop every proxy: (refused keys' requests, ok), (serving keys' …), streams."""
        refused, served = [0, 0], [0, 0]
        for proxy, accounts, numbers in self.started:
            proxy.stop()  # type: ignore[attr-defined]
            counts = C.read_key_counts(accounts)  # saved as the proxy stopped
            for totals, keys in ((refused, numbers[0::2]), (served, numbers[1::2])):
                found = C.sum_counts(counts, [C.bench_key(n) for n in keys])
                totals[0] += found[0]
                totals[1] += found[1]
        return (refused[0], refused[1]), (served[0], served[1]), len(self.started)

    @staticmethod
    def refused_keys(proxies: int) -> list[int]:
        return [n for i in range(proxies) for n in RetriedArm.key_numbers(i)[0::2]]


@dataclass
class Stream:
    number: int  # the fake server's request number
    sent_ns: int
    events: list[tuple[str, int]]  # (event name, arrival ns)
    stamps: list[int] = field(default_factory=list)  # server write ns, by event index
    received: int = 0  # bytes of the answer (head and body, as sent)

    def mb_per_s(self) -> float:
        """The answer's bytes over the time from sending the request to its last event
        (for a retried answer, the refusal's round trip included)."""
        return self.received / 1e6 / ((self.events[-1][1] - self.sent_ns) / 1e9)

    def legs_us(self) -> list[float]:
        return [(t - s) / 1000 for (_, t), s in zip(self.events, self.stamps)]

    def gaps_ms(self) -> list[float]:
        times = [t for _, t in self.events]
        return [(b - a) / 1e6 for a, b in zip(times, times[1:])]

    @property
    def first_leg_us(self) -> float:
        return self.legs_us()[0]

    @property
    def first_from_send_ms(self) -> float:
        return (self.events[0][1] - self.sent_ns) / 1e6


def streaming_request(port: int, key: str = C.PLACEHOLDER_KEY) -> bytes:
    body = json.dumps({**C.REQUEST_BODY, "stream": True}).encode()
    return (
        f"POST {C.MESSAGES_PATH} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/json\r\nAccept: text/event-stream\r\n"
        f"x-api-key: {key}\r\nanthropic-version: 2023-06-01\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body


def refusal_round_trip_ms(port: int, timeout: float) -> float:
    """One request the fake refuses (the retried arm's first key), sent and answered in full."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        started = time.monotonic_ns()
        sock.sendall(streaming_request(port, C.bench_key(RetriedArm.key_numbers(0)[0])))
        raw = b""
        while data := sock.recv(65536):
            raw += data
            head, _, body = raw.partition(b"\r\n\r\n")
            m = re.search(rb"content-length:\s*(\d+)", head, re.I)
            if m and len(body) >= int(m.group(1)):
                break
        took = (time.monotonic_ns() - started) / 1e6
    finally:
        sock.close()
    if not raw.startswith(b"HTTP/1.1 429"):
        raise RuntimeError(f"the refused key was not refused: {raw[:80]!r}")
    return took


def stream_once(port: int, timeout: float) -> Stream:
    """POST a streaming Messages request over a fresh connection; note each event's arrival."""
    request = streaming_request(port)
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        deadline = time.monotonic() + timeout
        sent = time.monotonic_ns()
        sock.sendall(request)
        raw = b""
        head = None
        chunked = False
        payload = b""  # decoded body not yet split into events
        events: list[tuple[str, int]] = []
        received = 0
        finished = False
        while not finished:
            if time.monotonic() > deadline:
                raise TimeoutError("stream did not finish in time")
            data = sock.recv(65536)
            now = time.monotonic_ns()
            if not data:
                break
            received += len(data)
            raw += data
            if head is None:
                end = raw.find(b"\r\n\r\n")
                if end < 0:
                    continue
                head, raw = raw[:end].decode("latin-1"), raw[end + 4:]
                status = int(head.split(" ", 2)[1])
                if status != 200:
                    raise RuntimeError(f"stream answered {status}: {head}")
                chunked = bool(re.search(r"^transfer-encoding:\s*chunked", head, re.I | re.M))
            if chunked:
                while True:
                    line_end = raw.find(b"\r\n")
                    if line_end < 0:
                        break
                    size = int(raw[:line_end].split(b";")[0], 16)
                    if size == 0:
                        finished = True
                        break
                    if len(raw) < line_end + 2 + size + 2:
                        break
                    payload += raw[line_end + 2:line_end + 2 + size]
                    raw = raw[line_end + 2 + size + 2:]
            else:
                payload, raw = payload + raw, b""
            while (cut := payload.find(b"\n\n")) >= 0:
                event, payload = payload[:cut], payload[cut + 2:]
                m = re.search(rb"^event: (\S+)", event, re.M)
                events.append((m.group(1).decode() if m else "?", now))
    finally:
        sock.close()
    m = re.search(r"^x-fake-kimi-request:\s*(\d+)", head or "", re.I | re.M)
    if m is None or not events:
        raise RuntimeError(f"not a stream from the fake server: {head!r}, {len(events)} events")
    return Stream(int(m.group(1)), sent, events, received=received)


def attach_stamps(fake, stream: Stream) -> None:
    last = len(stream.events) - 1
    collector = fake._collector  # set by processes.start_fake_kimi_process
    if collector.wait_for(re.compile(rf"^stamp {stream.number} {last} \d+$", re.M), 5.0) is None:
        raise RuntimeError(f"no stamps from the fake server for request {stream.number}")
    found = dict(re.findall(rf"^stamp {stream.number} (\d+) (\d+)$", collector.text(), re.M))
    stream.stamps = [int(found[str(i)]) for i in range(len(stream.events))]


def one_by_one(stream: Stream, delay_s: float) -> bool:
    """Every event arrived well before the next was written, spaced like the server wrote them."""
    half_ms = delay_s * 1000 / 2
    return max(stream.legs_us()) / 1000 < half_ms and min(stream.gaps_ms()) > half_ms


def throughput(work: Path, rounds: int, deltas: int, timeout: float) -> dict[str, list[float]]:
    """MB/s of long answers written at once (`deltas` text events, no delay) through the
    addon, clean and retried, alternating: what relaying each chunk into the held
    response costs when chunks come as fast as the server can write them."""
    proxies_needed = -(-(rounds + 1) // (STREAMS_PER_PROXY - 1))
    refuse = [arg for n in RetriedArm.refused_keys(proxies_needed) for arg in ("--refuse-key", C.bench_key(n))]
    found: dict[str, list[float]] = {"addon": [], "retried": []}
    with C.fake_kimi("--no-record", "--event-delay", "0", "--deltas", str(deltas), *refuse) as (_, port):
        clean = C.start_proxy(work, "throughput-addon", port, addon=True,
                              accounts=C.make_accounts_file(work / "throughput" / "kimi-accounts.json", 3))
        retried = RetriedArm(work / "throughput", port, timeout)
        try:
            stream_once(clean.port, timeout)  # warm-up
            for rnd in range(rounds):
                for arm in ("addon", "retried") if rnd % 2 == 0 else ("retried", "addon"):
                    found[arm].append(stream_once(retried.port() if arm == "retried" else clean.port, timeout).mb_per_s())
        finally:
            clean.stop()
            retried.stop()
    return found


def one_by_one_at_client(stream: Stream, delay_s: float) -> bool:
    """Spaced at the client like the server wrote them (no stamps needed)."""
    return min(stream.gaps_ms()) > delay_s * 1000 / 2


def main() -> int:
    ap = C.parser(__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, help="alternating rounds (default 5; quick 1)")
    ap.add_argument("--streams", type=int, help="streams per arm per round (default 6; quick 2)")
    ap.add_argument("--event-delay", type=float, help="seconds between SSE events (default 0.05; quick 0.02)")
    ap.add_argument("--deltas", type=int, help="text events of each throughput stream (default 5000; quick 500)")
    args = ap.parse_args()
    rounds = args.rounds or (1 if args.quick else 5)
    per_round = args.streams or (2 if args.quick else 6)
    delay = args.event_delay or (0.02 if args.quick else 0.05)

    C.print_header("streaming: SSE event latency through the proxy",
                   [f"{rounds} alternating round(s) x {per_round} streams per arm, one at a time; "
                    f"9 events per stream, {delay * 1000:.0f} ms apart (fake --event-delay {delay})"])
    stream_s = 9 * delay + 1
    budget = 60 + (rounds * per_round * len(ARMS) + 1) * (stream_s + 1)
    results: dict[str, list[list[Stream]]] = {arm: [] for arm in ARMS}
    refusals: list[float] = []
    # Each retried proxy serves a warm-up stream, then STREAMS_PER_PROXY - 1 measured ones.
    retried_proxies = -(-(rounds * per_round + 1) // (STREAMS_PER_PROXY - 1))
    refuse = [arg for n in RetriedArm.refused_keys(retried_proxies) for arg in ("--refuse-key", C.bench_key(n))]
    with C.watchdog(budget), C.workdir("streaming") as work, \
            C.fake_kimi("--no-record", "--event-delay", str(delay), *refuse,
                        module="bench._stamped_fake") as (fake, fake_port):
        accounts = C.make_accounts_file(work / "kimi-accounts.json", 3)
        retried = RetriedArm(work, fake_port, stream_s)
        proxies = {}
        try:
            proxies["bare"] = C.start_proxy(work, "bare", fake_port, addon=False,
                                            options={"stream_large_bodies": "1"})
            proxies["addon"] = C.start_proxy(work, "addon", fake_port, addon=True, accounts=accounts)
            proxies["buffered"] = C.start_proxy(work, "buffered", fake_port, addon=False)
            proxies["whole"] = C.start_proxy(work, "whole", fake_port, addon=True, accounts=C.make_accounts_file(
                work / "whole" / "kimi-accounts.json", 0, "round-robin", numbers=RetriedArm.key_numbers(0)[:2]),
                options={"kimi_affinity": "false", "kimi_stream_retries": "false"})
            ports = {"direct": fake_port, "bare": proxies["bare"].port, "addon": proxies["addon"].port}

            def port_of(arm: str) -> int:
                return retried.port() if arm == "retried" else ports[arm]

            for arm in ARMS:  # warm-up: connections, imports, first-flow paths
                if arm != "retried":  # each of its proxies is warmed up as it starts
                    stream_once(ports[arm], stream_s + 5)
            for rnd in range(rounds):
                shift = rnd % len(ARMS)
                for arm in ARMS[shift:] + ARMS[:shift]:
                    streams = []
                    for _ in range(per_round):
                        s = stream_once(port_of(arm), stream_s + 5)
                        attach_stamps(fake, s)
                        streams.append(s)
                    results[arm].append(streams)
                    legs = [s.first_leg_us for s in streams]
                    print(f"  round {rnd + 1} {arm:6}: first-event leg median {C.median(legs):7.0f} µs, "
                          f"one by one: {all(one_by_one(s, delay) for s in streams)}", flush=True)
            buffered = stream_once(proxies["buffered"].port, stream_s + 5)
            attach_stamps(fake, buffered)
            whole = stream_once(proxies["whole"].port, stream_s + 5)
            refusals = [refusal_round_trip_ms(proxies["bare"].port, 5) for _ in range(max(3, per_round))]
        except Exception:
            named = [*proxies.items(), *((f"retried-{i}", p) for i, (p, _, _) in enumerate(retried.started))]
            for name, proxy in named:  # what each proxy said, to tell why
                print(f"--- {name} proxy's output (end) ---\n{proxy.output()[-4000:]}", file=sys.stderr)
            raise
        finally:
            for proxy in proxies.values():
                proxy.stop()
            refused, served, retried_proxies = retried.stop()
        deltas = args.deltas or (500 if args.quick else 5000)
        rates = throughput(work, max(2, rounds), deltas, 60)
    retried_streams = rounds * per_round + retried_proxies  # the measured ones and each proxy's warm-up

    print()
    print("Per arm (all streams): legs are server write -> client read, in µs")
    rows = []
    for arm in ARMS:
        streams = [s for rnd in results[arm] for s in rnd]
        first = [s.first_leg_us for s in streams]
        later = [leg for s in streams for leg in s.legs_us()[1:]]
        gaps = [g for s in streams for g in s.gaps_ms()]
        rows.append([arm, len(streams), f"{C.median(first):.0f}", f"{C.percentile(first, 90):.0f}",
                     f"{C.median(later):.0f}", f"{max(max(s.legs_us()) for s in streams):.0f}",
                     f"{C.median([s.first_from_send_ms for s in streams]):.2f}",
                     f"{min(gaps):.1f}..{max(gaps):.1f}",
                     f"{sum(one_by_one(s, delay) for s in streams)}/{len(streams)}"])
    first_b = buffered.legs_us()
    rows.append(["bare, no stream option", 1, f"{first_b[0]:.0f}", "-", f"{C.median(first_b[1:]):.0f}",
                 f"{max(first_b):.0f}", f"{buffered.first_from_send_ms:.2f}",
                 f"{min(buffered.gaps_ms()):.1f}..{max(buffered.gaps_ms()):.1f}",
                 f"{int(one_by_one(buffered, delay))}/1"])
    C.print_table(["arm", "streams", "1st leg p50", "1st leg p90", "later legs p50", "worst leg",
                   "send→1st ms", "gaps ms", "one by one"], rows)
    print(f"(gaps: time between consecutive events at the client; the server wrote them {delay * 1000:.0f} ms "
          f"apart. 'one by one': every leg < {delay * 500:.0f} ms and every gap > {delay * 500:.0f} ms)")
    print()

    paired = [C.median([s.first_leg_us for s in a]) / C.median([s.first_leg_us for s in b])
              for a, b in zip(results["addon"], results["bare"])]
    ratio = C.median(paired)
    med = {arm: C.median([s.first_leg_us for rnd in results[arm] for s in rnd]) for arm in ARMS}
    added_b, added_a = med["bare"] - med["direct"], med["addon"] - med["direct"]
    streamed = all(one_by_one(s, delay) for arm in ("bare", "addon", "retried") for rnd in results[arm] for s in rnd)
    print(f"first-event leg, addon / bare: {ratio:.3f} (median of per-round ratios, rounds {C.spread(paired)}); "
          f"target ≤ {TARGET_RATIO}: {C.verdict(ratio <= TARGET_RATIO)}")
    print(f"added over direct: bare {added_b:+.0f} µs, addon {added_a:+.0f} µs "
          f"(the proxy hop itself; addon/bare of that = {added_a / added_b:.2f})" if added_b > 0 else
          f"added over direct: bare {added_b:+.0f} µs, addon {added_a:+.0f} µs")
    print(f"events arrive one by one through the proxies (retried included): {C.verdict(streamed)}; "
          f"without stream_large_bodies bare mitmdump held the first event {first_b[0] / 1000:.0f} ms "
          f"(until the stream's end), one by one: {one_by_one(buffered, delay)}")
    send_first = {arm: C.median([s.first_from_send_ms for rnd in results[arm] for s in rnd]) for arm in ARMS}
    refusal_ms = C.median(refusals)
    cost_ms = send_first["retried"] - send_first["addon"]
    every_refused = refused == (retried_streams, 0) and served == (retried_streams, retried_streams)
    print(f"retried: every stream refused on its first key and served by the second: {C.verdict(every_refused)} "
          f"(refused keys {refused[0]} requests, {refused[1]} ok; serving keys {served[0]}, {served[1]} ok; "
          f"{retried_streams} streams, {retried_proxies} proxies of {PAIRS_PER_PROXY} pairs of keys)")
    print(f"retried: send→1st event {send_first['retried']:.2f} ms vs {send_first['addon']:.2f} ms clean: "
          f"{cost_ms:+.2f} ms; one refusal round trip (through bare mitmdump) {refusal_ms:.2f} ms; "
          f"target ≤ refusal + {RETRY_SLACK_MS:g} ms: {C.verdict(cost_ms <= refusal_ms + RETRY_SLACK_MS)}")
    print(f"retried with kimi_stream_retries=false (one stream, as before issue 29): send→1st event "
          f"{whole.first_from_send_ms:.2f} ms, one by one: {one_by_one_at_client(whole, delay)} (the answer came whole)")
    print(f"retried: later events' leg {C.median([l for rnd in results['retried'] for s in rnd for l in s.legs_us()[1:]]):.0f} µs "
          f"vs {C.median([l for rnd in results['addon'] for s in rnd for l in s.legs_us()[1:]]):.0f} µs clean "
          f"(a relayed event passes through mitmproxy's layers once more, into the client's stream)")
    ratio_mb = C.median(rates["retried"]) / C.median(rates["addon"])
    print(f"throughput ({deltas} text events written at once, {len(rates['addon'])} streams per arm, "
          f"bytes over request→last event): "
          f"clean {C.median(rates['addon']):.1f} MB/s, retried {C.median(rates['retried']):.1f} MB/s "
          f"(retried / clean {ratio_mb:.2f}; relayed chunks that come while one is on its way to the client "
          f"go with it, in one pass through mitmproxy's layers)")
    if not every_refused:
        print("FAIL: the retried arm did not retry every stream; its figures measure something else")
        return 1
    if args.quick:
        print("(--quick: few streams; the figures are rough)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
